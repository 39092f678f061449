"""Teacher-forced scoring: one batched forward pass gives every single-pass measure of SPEC.

For a sequence x_1..x_T the forward pass yields, at each position t = 1..T, the next-token distribution
p(. | x_1..x_t). From it:

    MA      = mean_{t=2..T} [argmax p(.|x_<t) == x_t]            (memorization accuracy)
    loss    = mean_{t=2..T} -log p(x_t|x_<t)
    zlib    = sum_{t=2..T} -log p(x_t|x_<t) / len(zlib.compress(text))
    mink    = mean of the lowest 20% of log p(x_t|x_<t)           (Min-K% Prob)
    minkpp  = mean of the lowest 20% of (log p(x_t) - mu_t) / sigma_t  (Min-K%++)
    verbatim = all argmax right on the suffix after P = min(prefix_tokens, T // 2) tokens
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..io.models import Runtime
from ..io.tokens import length_batches, pad

MIN_K_FRACTION = 0.2


@dataclass(frozen=True)
class TokenScores:
    """Per-token results for one sequence of T tokens; arrays of length T-1 describe x_2..x_T."""

    ids: list[int]
    hits: np.ndarray  # bool: teacher-forced argmax == x_t
    logprobs: np.ndarray  # log p(x_t | x_<t)
    minkpp_z: np.ndarray  # (log p(x_t) - mu_t) / sigma_t
    greedy: np.ndarray  # int: argmax p(. | x_1..x_t) for t = 1..T-1 (greedy[t-1] is the guess for x_{t+1})

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    @property
    def ma(self) -> float:
        return float(self.hits.mean())

    @property
    def loss(self) -> float:
        return float(-self.logprobs.mean())

    def verbatim(self, prefix_tokens: int) -> bool:
        prefix = min(prefix_tokens, self.n_tokens // 2)
        # hits[i] scores token x_{i+2}; the suffix x_{P+1}..x_T is hits[P-1:].
        return bool(self.hits[max(prefix - 1, 0) :].all())

    def zlib_ratio(self, text: str) -> float:
        return float(-self.logprobs.sum() / len(zlib.compress(text.encode("utf-8"))))

    @property
    def mink(self) -> float:
        return _lowest_mean(self.logprobs)

    @property
    def minkpp(self) -> float:
        return _lowest_mean(self.minkpp_z)


def _lowest_mean(values: np.ndarray) -> float:
    k = max(1, math.ceil(MIN_K_FRACTION * len(values)))
    return float(np.sort(values)[:k].mean())


def forward_logits(model, input_ids: torch.Tensor, mask: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The teacher-forced forward pass every score and loss is made of: logits (batch, width, vocab) in the
    runtime's compute dtype, row t the distribution over x_{t+1}. Differentiable unless called under no_grad."""
    with runtime.autocast():
        return model(input_ids=input_ids, attention_mask=mask).logits


def token_logprobs(model, input_ids: torch.Tensor, mask: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 2..width, shape (batch, width-1); differentiable (used by the losses)."""
    logits = forward_logits(model, input_ids, mask, runtime)[:, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def score_tokens(model, token_lists: list[list[int]], runtime: Runtime, batch_size: int = 8,
                 pad_id: int = 0) -> list[TokenScores]:
    """Score every sequence with one teacher-forced forward pass per batch (right padding)."""
    results: list[TokenScores | None] = [None] * len(token_lists)
    for indices in length_batches(token_lists, batch_size):
        batch = [token_lists[i] for i in indices]
        input_ids, mask = pad(batch, pad_id, device=runtime.device)
        logits = forward_logits(model, input_ids, mask, runtime)[:, :-1]
        for row, index in enumerate(indices):
            n = len(batch[row])
            results[index] = _scores_of_row(batch[row], logits[row, : n - 1].float())
    return results  # type: ignore[return-value]


def minkpp_z(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-K%++'s per-token score z_t = (log p(x_t) - mu_t) / sigma_t, with mu_t and sigma_t the mean and std of
    log p(v) for v drawn from p itself: `logprobs` (..., vocab) log-softmax, `targets` (...) the ids x_t.
    Differentiable (the hinge's z floor trains on it)."""
    probs = logprobs.exp()
    mu = (probs * logprobs).sum(-1)
    sigma = ((probs * logprobs.square()).sum(-1) - mu.square()).clamp_min(1e-12).sqrt()
    return (logprobs.gather(-1, targets[..., None]).squeeze(-1) - mu) / sigma


def _scores_of_row(ids: list[int], logits: torch.Tensor) -> TokenScores:
    """logits: (T-1, V) float32, row t-1 is the distribution over x_{t+1}."""
    targets = torch.tensor(ids[1:], device=logits.device)
    logprobs = torch.log_softmax(logits, dim=-1)
    target_lp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    # torch.argmax returns the first maximal index: ties break to the lowest token id, as SPEC asks.
    greedy = logits.argmax(-1)
    return TokenScores(
        ids=list(ids),
        hits=(greedy == targets).cpu().numpy(),
        logprobs=target_lp.cpu().double().numpy(),
        minkpp_z=minkpp_z(logprobs, targets).cpu().double().numpy(),
        greedy=greedy.cpu().numpy(),
    )


@dataclass(frozen=True)
class LeanScores:
    """The measures of TokenScores that need no statistic over the whole vocabulary: MA, loss, verbatim, zlib.

    What a corpus scan keeps of a window. The formulas are TokenScores' own (one definition of each)."""

    hits: np.ndarray  # bool: teacher-forced argmax == x_t, for x_2..x_T
    logprobs: np.ndarray  # log p(x_t | x_<t), float64

    @property
    def n_tokens(self) -> int:
        return len(self.hits) + 1

    ma = TokenScores.ma
    loss = TokenScores.loss
    verbatim = TokenScores.verbatim
    zlib_ratio = TokenScores.zlib_ratio


# Logits are normalized a few positions at a time: a float32 copy of this many bytes stays in cache, where one
# of the whole batch (hundreds of MB for a large vocabulary) would be written to memory and read back.
CHUNK_BYTES = 1 << 20


@torch.no_grad()
def lean_scores(model, token_lists: list[list[int]], runtime: Runtime, batch_size: int = 8,
                pad_id: int = 0) -> list[LeanScores]:
    """score_tokens without Min-K%++ or the greedy tokens: the same hits and log-probabilities (up to float
    rounding) at a fraction of the per-token cost.

    score_tokens makes several float32 passes over the vocabulary per token (log_softmax, exp, mu, sigma) on
    a copy of the whole row; here one cache-sized chunk of positions at a time gives the maximum (and its
    first index: the greedy guess) and the log-normalizer. Callers that score many batches can wrap the calls
    in one `runtime.autocast()` region: autocast then casts the weights once instead of once per batch.
    """
    results: list[LeanScores | None] = [None] * len(token_lists)
    for indices in length_batches(token_lists, batch_size):
        batch = [token_lists[i] for i in indices]
        input_ids, mask = pad(batch, pad_id, device=runtime.device)
        logits = forward_logits(model, input_ids, mask, runtime)
        for row, index in enumerate(indices):
            targets = input_ids[row, 1 : len(batch[row])]
            hits, logprobs = _hits_and_logprobs(logits[row, : len(targets)], targets)
            results[index] = LeanScores(hits=hits.cpu().numpy(), logprobs=logprobs.cpu().double().numpy())
    return results  # type: ignore[return-value]


def _hits_and_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (T-1, V) in any float dtype, row t-1 the distribution over x_{t+1}; targets: (T-1,)."""
    step = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    hits, logprobs = [], []
    for start in range(0, len(targets), step):
        chunk = logits[start : start + step].float()  # exact: bf16 and fp16 values are float32 values
        wanted = targets[start : start + step]
        # max(dim) returns the first maximal index, as argmax does: ties go to the lowest token id (SPEC).
        best, guess = chunk.max(-1)
        target_logits = chunk.gather(-1, wanted[:, None]).squeeze(-1)
        log_norm = best + chunk.sub_(best[:, None]).exp_().sum(-1).log()
        hits.append(guess == wanted)
        logprobs.append(target_logits - log_norm)
    return torch.cat(hits), torch.cat(logprobs)


@torch.no_grad()
def layer_hits(model, token_lists: list[list[int]], layers: list[int], readout: Callable[[torch.Tensor], torch.Tensor],
               runtime: Runtime, batch_size: int = 8, pad_id: int = 0) -> list[np.ndarray]:
    """Teacher-forced argmax hits read from hidden layers, batched as `score_tokens` batches.

    For each sequence x_1..x_T a bool array (len(layers), T-1): entry [i, t-2] is
    [argmax readout(h_l)_{t-1} == x_t] for l = layers[i] and t = 2..T, where h_l is `hidden_states[l]` of the
    forward pass (Hugging Face: 0 the embeddings, l the residual stream after l blocks). The positions are
    `TokenScores.hits`' own, so `hits.mean(-1)` is MA per layer.
    """
    results: list[np.ndarray | None] = [None] * len(token_lists)
    for indices in length_batches(token_lists, batch_size):
        batch = [token_lists[i] for i in indices]
        input_ids, mask = pad(batch, pad_id, device=runtime.device)
        with runtime.autocast():
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
            # One layer's logits at a time: (batch, width, vocab) for every layer at once would not fit large models.
            guesses = torch.stack([readout(hidden[layer][:, :-1]).argmax(-1) for layer in layers], dim=1)
        hits = (guesses == input_ids[:, None, 1:]).cpu().numpy()
        for row, index in enumerate(indices):
            results[index] = hits[row, :, : len(batch[row]) - 1]
    return results  # type: ignore[return-value]
