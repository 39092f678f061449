"""A tiny Llama that really memorizes: built and trained in seconds, saved as a normal HF folder.

Sequences are sentences of random words from a small vocabulary. "Members" are trained on, some repeated
many times (memorized, extractable), some seen once (partly memorized); "nonmembers" are never seen and
calibrate the band.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unmemorize.io.models import Runtime, make_runtime, save_checkpoint
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode
from unmemorize.unlearning.train import finetune

KEYS = [f"k{i}" for i in range(12)]
VALUES = [f"v{i}" for i in range(48)]
WORDS = KEYS + VALUES
SPECIAL = ["<pad>", "<unk>", "<eos>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def sentences(count: int, seed: int) -> list[str]:
    """Record-like: fixed keys in a fixed order, each followed by a random value (k0 v17 k1 v3 ...).

    Keys are predictable from the format alone, values only from memory, so an unseen record scores MA
    near 0.5 and a memorized one near 1, as with real records.
    """
    rng = random.Random(seed)
    return [" ".join(f"{key} {rng.choice(VALUES)}" for key in KEYS[: rng.randint(8, 12)]) for _ in range(count)]


def tiny_sets(seed: int = 0) -> dict[str, list[Sequence]]:
    texts = sentences(40, seed)
    make = lambda prefix, items: [Sequence(f"{prefix}{i}", t) for i, t in enumerate(items)]  # noqa: E731
    return {
        "forget": make("f", texts[:8]),  # f0-f3 repeated 8x (memorized), f4-f7 seen once
        "retain": make("r", texts[8:20]),
        "holdout": make("h", texts[20:40]),
    }


def build_tiny_model(folder: Path, seed: int = 0, epochs: int = 12, oracle: bool = False,
                     runtime: Runtime | None = None) -> dict[str, list[Sequence]]:
    """Train the tiny model on forget + retain (forget f0-f3 eight times) and save it to `folder`.

    `oracle=True` trains the same recipe without the forget set: what exact unlearning would give. `runtime`:
    where and in what precision to train (default CPU float32; bench/gpu_check.py trains on the GPU).
    """
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=None,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    sets = tiny_sets(seed)
    train = sets["forget"][:4] * 8 + sets["forget"][4:] + sets["retain"] * 3
    if oracle:
        train = sets["retain"] * 3
    runtime = runtime or make_runtime("cpu", "float32")
    model.to(runtime.device, runtime.weights)
    ids = encode(tokenizer, train, 256)
    finetune(model, ids, epochs=epochs, lr=3e-3, batch_size=8, seed=seed, runtime=runtime, pad_id=0,
             description="tiny model")
    save_checkpoint(model, tokenizer, folder)
    return sets


def build_method(method: str, tokenizer, **args):
    """The first stage of `method` with options `args`, the way a run builds it (validated by the settings)."""
    from unmemorize.runs.config import UnlearnSettings

    settings = UnlearnSettings(method=method, method_args=args)
    return settings.spec.build(settings.method_args, tokenizer)[0]


def perturb(model, seed: int = 1, scale: float = 0.05) -> None:
    """Add seeded Gaussian noise to every weight (so a model differs from its reference copy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
