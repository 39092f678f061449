"""Causal tracing (Meng et al. 2022, ROME): which layers' MLPs carry a memorized continuation.

For a sequence x_1..x_T split as SPEC splits it for verbatim extraction (prefix x_1..x_P, P = min(prefix_tokens,
T // 2); continuation x_{P+1}..x_T), score a run of the model by the continuation's mean token probability,
teacher-forced:

    s = mean_{t=P+1..T} p(x_t | x_<t)

Three kinds of run:
  - clean:      the model as it is;                                                       s_clean
  - corrupted:  Gaussian noise N(0, nu^2) added to the token embeddings of the prefix,
                nu = noise x the standard deviation of the clean prefix embeddings
                (every entry of every traced prefix; ROME's 3 sigma);                       s_corrupt
  - patched l:  the corrupted run with layer l's MLP output replaced by its value in the
                clean run at the positions after the prefix (P+1..T);                       s_l

and the effect of layer l (ROME's indirect effect of its MLP) is

    effect_l = mean over noise samples of (s_l - s_corrupt)

(each sample draws the prefix noise once; its corrupted and patched runs share it). Only the prefix is noised, so
what the continuation loses is what the model had to read from the prefix to recall it; a layer whose MLP does that
recall gets a large effect: its clean output brings the continuation back although everything it reads is
corrupted. `ranking()` orders layers by the mean effect over the traced sequences.

Two departures from ROME, which restores one (token, layer) state at a time. (1) A layer's MLP output is restored at
every position after the prefix at once: one patched run per layer instead of one per layer and token (a 30-layer
model, 64 tokens: 30 runs, not 1,920). (2) It is never restored at a noised position: there the clean output would
partly undo the noise itself. On the demo victim (SmolLM2-135M), restoring the first layer's MLP at every position
brought back 0.43 of the 0.44 the noise took, for every sequence: the first MLP, which writes large activations on
every token, washes the noise out, whatever the memory. After the prefix the first MLP restores nothing and the
late layers rank first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..io.models import Runtime
from ..io.tokens import length_batches, pad
from .scoring import token_logprobs

NOISE = 3.0  # ROME: nu = 3 sigma
SAMPLES = 3  # noise draws per sequence


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM: the ModuleList holding the most parameters (Llama's
    `model.layers`, GPT-2's `transformer.h`, ...), through a PEFT, DDP or FSDP wrapper; empty when there is none."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=torch.nn.ModuleList())


MLP_NAMES = ("mlp", "feed_forward")  # Llama, Qwen, Mistral, Gemma, Phi, GPT-2, GPT-NeoX, Falcon...; Llama 4


def mlp_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A decoder block's MLP module, None when the block has none as one module (OPT's fc1 and fc2)."""
    return next((getattr(layer, name) for name in MLP_NAMES if isinstance(getattr(layer, name, None),
                                                                          torch.nn.Module)), None)


def traceable(model) -> bool:
    """Whether every decoder block of `model` has an MLP module that causal tracing can restore."""
    layers = decoder_layers(model)
    return len(layers) > 0 and all(mlp_of(layer) is not None for layer in layers)


@dataclass(frozen=True)
class Tracing:
    """Per-sequence results; `effects[i, l]` is sequence i's effect of layer l (mean over noise samples)."""

    effects: np.ndarray  # (sequences, layers)
    clean: np.ndarray  # (sequences,) s_clean
    corrupted: np.ndarray  # (sequences,) s_corrupt, mean over noise samples
    noise_std: float  # nu
    samples: int

    @property
    def mean_effects(self) -> np.ndarray:
        return self.effects.mean(0)

    def ranking(self) -> list[int]:
        """Layers by mean effect, largest first (ties: the lower layer first)."""
        return sorted(range(self.effects.shape[1]), key=lambda layer: (-self.mean_effects[layer], layer))

    def to_json(self, names: list[str] | None = None) -> dict:
        names = names or [str(i) for i in range(len(self.clean))]
        return {"measure": "mean continuation token probability", "restored": "mlp output after the prefix",
                "noise_std": self.noise_std, "samples": self.samples,
                "mean_effect": self.mean_effects.tolist(), "ranking": self.ranking(),
                "clean": float(self.clean.mean()), "corrupted": float(self.corrupted.mean()),
                "sequences": [{"id": name, "clean": float(c), "corrupted": float(k), "effect": e.tolist()}
                              for name, c, k, e in zip(names, self.clean, self.corrupted, self.effects,
                                                       strict=True)]}


def prefix_length(n_tokens: int, prefix_tokens: int) -> int:
    """P = min(prefix_tokens, T // 2): the prefix of SPEC's verbatim check (`TokenScores.verbatim`)."""
    return min(prefix_tokens, n_tokens // 2)


@torch.no_grad()
def causal_trace(model, token_lists: list[list[int]], prefix_tokens: int, runtime: Runtime, *,
                 noise: float = NOISE, samples: int = SAMPLES, seed: int = 0, batch_size: int = 8,
                 pad_id: int = 0) -> Tracing:
    """Trace every sequence of `token_lists` (each of at least 2 tokens) through every layer's MLP; see the
    module's docstring. The noise of sequence i's sample k comes from a generator seeded by (seed, i, k): results
    do not depend on batching."""
    layers = decoder_layers(model)
    embedding = model.get_input_embeddings()
    nu = noise * prefix_embedding_std(embedding, token_lists, prefix_tokens)
    n, depth = len(token_lists), len(layers)
    effects, clean, corrupted = np.zeros((n, depth)), np.zeros(n), np.zeros(n)
    for indices in length_batches(token_lists, batch_size):
        batch = [token_lists[i] for i in indices]
        input_ids, mask = pad(batch, pad_id, device=runtime.device)
        prefix, continuation = (m.to(runtime.device) for m in split_masks(batch, prefix_tokens, input_ids.shape[1]))

        def score() -> torch.Tensor:
            """s of each row under the hooks in place (the batch's one forward pass)."""
            probs = token_logprobs(model, input_ids, mask, runtime).exp()  # noqa: B023 (called in this iteration)
            return (probs * continuation).sum(-1) / continuation.sum(-1).clamp_min(1)  # noqa: B023

        with capture_mlp_outputs(layers) as outputs:
            clean[indices] = score().cpu().numpy()
        for sample in range(samples):
            noises = [prefix_noise(seed, i, sample, int(prefix[row].sum()), embedding.embedding_dim)
                      for row, i in enumerate(indices)]
            with corrupt_prefix(embedding, prefix, noises, nu):
                base = score()
                corrupted[indices] += base.cpu().numpy() / samples
                for layer in range(depth):
                    with restore_output(mlp_of(layers[layer]), outputs[layer], ~prefix):
                        effects[indices, layer] += (score() - base).cpu().numpy() / samples
    return Tracing(effects=effects, clean=clean, corrupted=corrupted, noise_std=nu, samples=samples)


def split_masks(batch: list[list[int]], prefix_tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix, continuation) of right-padded rows: prefix (rows, width) marks the positions of x_1..x_P;
    continuation (rows, width - 1), over the predicted tokens x_2..x_W, is 1 where x_t is x_{P+1}..x_T."""
    prefix = torch.zeros(len(batch), width, dtype=torch.bool)
    continuation = torch.zeros(len(batch), width - 1)
    for row, ids in enumerate(batch):
        p = prefix_length(len(ids), prefix_tokens)
        prefix[row, :p] = True
        continuation[row, p - 1 : len(ids) - 1] = 1.0  # entry t-2 scores x_t
    return prefix, continuation


def prefix_embedding_std(embedding: torch.nn.Module, token_lists: list[list[int]], prefix_tokens: int) -> float:
    """sigma: the standard deviation of every entry of the traced prefixes' token embeddings."""
    ids = [t for ids in token_lists for t in ids[: prefix_length(len(ids), prefix_tokens)]]
    weight = embedding.weight
    return float(weight[torch.tensor(ids, device=weight.device)].float().std())


def prefix_noise(seed: int, index: int, sample: int, length: int, width: int) -> torch.Tensor:
    """Standard normal noise (length, width) for sequence `index`'s noise sample `sample`."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_009 + sample)
    return torch.randn(length, width, generator=generator)


@contextmanager
def capture_mlp_outputs(layers: torch.nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """While inside, each forward pass leaves every layer's MLP output (batch, width, hidden) in the list."""
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def keep(layer: int):
        def hook(module, args, output):
            outputs[layer] = output.detach()
        return hook

    handles = [mlp_of(block).register_forward_hook(keep(k)) for k, block in enumerate(layers)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def corrupt_prefix(embedding: torch.nn.Module, prefix: torch.Tensor, noises: list[torch.Tensor],
                   nu: float) -> Iterator[None]:
    """While inside, the token embeddings of row b's prefix positions get nu * noises[b] added."""
    def hook(module, args, output):
        added = torch.zeros_like(output, dtype=torch.float32)
        for row, noise in enumerate(noises):
            added[row, prefix[row]] = noise.to(added.device)
        return output + (nu * added).to(output.dtype)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def restore_output(module: torch.nn.Module, clean: torch.Tensor, where: torch.Tensor) -> Iterator[None]:
    """While inside, `module`'s output at the positions `where` (batch, width) is replaced by `clean` (its output
    in the clean run)."""
    handle = module.register_forward_hook(
        lambda mod, args, output: torch.where(where[..., None], clean.to(output.dtype), output))
    try:
        yield
    finally:
        handle.remove()
