"""Weights stored in the formats people deploy, and back: llama.cpp's GGUF block formats (via `gguf.quants`,
the Python port of ggml-quants.c). The quantization attacks (`evaluate.attacks.quantize`, where the formulas are
written out) and quantization-aware unlearning (`--harden`, `unlearning.target`) both round-trip weights here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

GGUF_FORMATS: dict[str, GGMLQuantizationType] = {
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q5_0": GGMLQuantizationType.Q5_0,
    "Q4_1": GGMLQuantizationType.Q4_1,
    "Q4_0": GGMLQuantizationType.Q4_0,
}
GGUF_RULES = {
    "Q8_0": "d = max|w| / 127, w' = d round(w / d)",
    "Q5_0": "d = w_m / -16 (w_m the signed weight of largest magnitude), q = clamp(round(w / d) + 16, 0, 31), "
            "w' = d (q - 16)",
    "Q4_1": "d = (max w - min w) / 15, q = clamp(round((w - min w) / d), 0, 15), w' = d q + min w",
    "Q4_0": "d = w_m / -8 (w_m the signed weight of largest magnitude), q = clamp(round(w / d) + 8, 0, 15), "
            "w' = d (q - 8)",
}

def weight_matrices(model: nn.Module, embeddings: bool = True) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every nn.Linear (and nn.Embedding) module; a tensor shared by two modules once."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    seen: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            found.append((f"{name}.weight", module.weight))
    return found


def gguf_round_trip(weight: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor | None:
    """w' of a 2-D weight stored in the GGUF type `qtype`, blocks along dim 1; None when rows don't fit blocks."""
    block, _ = GGML_QUANT_SIZES[qtype]
    if weight.shape[-1] % block:
        return None
    array = weight.detach().float().cpu().numpy()
    restored = dequantize(quantize(array, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(restored, dtype=np.float32)).to(weight.device)


def round_trip_weights(model: nn.Module, fmt: str,
                       embeddings: bool = True) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, its round trip through the GGUF format `fmt`) for every weight matrix of `model` whose rows fit
    the format's blocks (the others stay in float, as llama.cpp keeps them); the model is not changed."""
    qtype = GGUF_FORMATS[fmt]
    pairs = [(weight, gguf_round_trip(weight, qtype)) for _, weight in weight_matrices(model, embeddings)]
    return [(weight, restored) for weight, restored in pairs if restored is not None]


@contextmanager
def weights_swapped(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> Iterator[None]:
    """Inside the block each weight holds its replacement; afterwards exactly (bit for bit) what it held before.
    Gradients taken inside land in the weights' .grad as usual."""
    kept = [weight.detach().clone() for weight, _ in pairs]
    with torch.no_grad():
        for weight, replacement in pairs:
            weight.copy_(replacement.to(weight.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for (weight, _), value in zip(pairs, kept, strict=True):
                weight.copy_(value)
