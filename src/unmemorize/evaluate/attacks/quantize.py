"""Quantization attacks: round the weights to a deployed low-bit format and back.

Unlearning can move weights by less than a quantization step; rounding them then lands near the
original, memorizing weights again (Zhang et al. 2024, "Catastrophic failure of LLM unlearning via
quantization"). Each attack round-trips every nn.Linear weight, and by default the token embeddings (a tied
output head is one tensor, quantized once), in place on a copy of the model; biases and norms stay as they
are. The round trip is computed in float32 and stored in the weights' dtype.

GGUF formats, as llama.cpp stores them (gguf.quants, the Python port of ggml-quants.c): blocks of 32
consecutive weights w_1..w_32 of a row (along the input dimension), one float16 scale d per block
(d' = fp16(d) below), w_m the signed weight of largest |w|, round() half away from zero, |_x + 1/2_| half up:

    Q8_0  (8.5 bits/weight)  d = max|w| / 127          q = round(w / d)                       w' = d' q
    Q5_0  (5.5 bits/weight)  d = w_m / -16             q = min(|_w / d + 16 + 1/2_|, 31)      w' = d' (q - 16)
    Q4_1  (5 bits/weight)    d = (max w - min w) / 15  q = min(|_(w - min w) / d + 1/2_|, 15)
                                                       w' = d' q + fp16(min w)
    Q4_0  (4.5 bits/weight)  d = w_m / -8              q = min(|_w / d + 8 + 1/2_|, 15)       w' = d' (q - 8)

(an all-zero block stays zero). A tensor whose rows are not a multiple of 32 long cannot be stored in these
formats; llama.cpp's converter keeps it in float (F16/F32), and so does this attack: it is left exactly as
it is and named in the report's `unquantized`. llama-quantize's mixes (e.g. the output head in Q6_K) are
not reproduced: every tensor gets the one format, like `llama-quantize --pure`.

Symmetric absmax simulation (absmax_8bit, absmax_4bit), groups of weights w_1..w_g with b bits:

    qmax  = 2^(b-1) - 1               (127 for 8 bits, 7 for 4 bits: levels -qmax..qmax, zero exact)
    scale = max_i |w_i| / qmax
    w'_i  = clamp(round(w_i / scale), -qmax, qmax) * scale

so |w_i - w'_i| <= scale / 2. 8 bits: one group per output row; 4 bits: `group_size` consecutive weights
along the input dimension (the last group of a row may be shorter).

bitsandbytes NF4 (quantize_nf4, 4.5 bits/weight; CUDA and bitsandbytes only): blocks of 64 consecutive
weights, s = max|w| (float32), w' = s * v where v is the NF4 level (16 quantiles of N(0, 1) scaled to
[-1, 1]) nearest to w / s. Without CUDA or bitsandbytes the attack is skipped and says why.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES
from torch import nn
from torch.nn import functional as F

from ...io.quantize import GGUF_FORMATS, GGUF_RULES, gguf_round_trip, weight_matrices
from .common import AttackContext, audit_rows, counts, holdout_summary

NF4_BLOCK = 64

RoundTrip = Callable[[torch.Tensor], torch.Tensor | None]


def absmax_round_trip(weight: torch.Tensor, bits: int,
                      group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w', scale) for a 2-D weight: groups of `group_size` along dim 1 (None: the whole row).

    `scale` has the shape of `weight` (each weight's own group scale), so the bound is checkable per element.
    """
    qmax = 2 ** (bits - 1) - 1
    rows, cols = weight.shape
    group = cols if group_size is None else min(group_size, cols)
    padded = F.pad(weight.float(), (0, -cols % group))  # zeros never change a group's absmax
    groups = padded.view(rows, -1, group)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))  # an all-zero group stays zero
    quantized = (groups / scale).round().clamp(-qmax, qmax) * scale
    return (quantized.view(rows, -1)[:, :cols], scale.expand_as(groups).reshape(rows, -1)[:, :cols])


def nf4_unavailable() -> str | None:
    """Why bitsandbytes NF4 cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "bitsandbytes NF4 needs a CUDA device and none is available"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes NF4 needs the bitsandbytes package, which is not installed"
    return None


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """w' of a weight quantized to bitsandbytes NF4 (blocks of 64, float32 absmax, no double quantization)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    data = weight.detach().to("cuda" if weight.device.type != "cuda" else weight.device)
    packed, state = quantize_4bit(data, blocksize=NF4_BLOCK, compress_statistics=False, quant_type="nf4")
    return dequantize_4bit(packed, state).float().to(weight.device)


@torch.no_grad()
def quantize_model(model: nn.Module, round_trip: RoundTrip, embeddings: bool = True) -> dict:
    """Replace each weight matrix w of `model` by round_trip(w) in place (None: left as it is); the report.

    relative_error = ||w - w'|| / ||w|| over all quantized weights together (Frobenius norms).
    """
    tensors, values, max_error, error_sq, norm_sq, unquantized = 0, 0, 0.0, 0.0, 0.0, []
    for name, weight in weight_matrices(model, embeddings):
        restored = round_trip(weight)
        if restored is None:
            unquantized.append(name)
            continue
        error = weight.float() - restored
        max_error = max(max_error, float(error.abs().max()))
        error_sq, norm_sq = error_sq + float(error.square().sum()), norm_sq + float(weight.float().square().sum())
        weight.copy_(restored.to(weight.dtype))
        tensors, values = tensors + 1, values + weight.numel()
    return {"tensors": tensors, "weights": values, "unquantized": unquantized, "max_abs_error": max_error,
            "relative_error": (error_sq / norm_sq) ** 0.5 if norm_sq else 0.0}


def tampered_result(ctx: AttackContext, model: nn.Module, description: str, settings: dict, report: dict) -> dict:
    """An attack's result on `model` (a changed copy): audited with EL off, the band recalibrated on the
    changed model's own holdout, each forget sequence beside its baseline."""
    forget = ctx.sets["forget"]
    result = ctx.audit(model, {"forget": forget, "holdout": ctx.sets["holdout"]})
    rows = audit_rows(ctx, result, forget)
    return {"description": description, "settings": settings, **counts(rows), **report, **holdout_summary(result),
            "sequences": rows}


def skipped_result(description: str, settings: dict, reason: str) -> dict:
    """The result of an attack that could not run here: nothing measured, and why."""
    return {"description": description, "settings": settings, "skipped": reason, **counts([]), "sequences": []}


def _which(embeddings: bool) -> str:
    return "Every linear weight" + (" and the embedding" if embeddings else "")


AUDITED = ", then audited (EL off); the band is recalibrated on the quantized model's holdout."


def gguf_attack(ctx: AttackContext, fmt: str) -> dict:
    """Round-trip the weights through the GGUF format `fmt` (Q8_0, Q5_0, Q4_1, Q4_0) and audit."""
    embeddings = ctx.settings.quantize_embeddings
    qtype = GGUF_FORMATS[fmt]
    block, size = GGML_QUANT_SIZES[qtype]
    bits = 8 * size / block
    model = ctx.weights_copy()
    report = quantize_model(model, lambda w: gguf_round_trip(w, qtype), embeddings)
    left = report["unquantized"]
    description = (f"{_which(embeddings)} stored as llama.cpp GGUF {fmt} ({bits:g} bits/weight: blocks of {block} "
                   f"along the input dimension, float16 scale; {GGUF_RULES[fmt]})" + AUDITED
                   + (f" {len(left)} tensor(s) with rows not a multiple of {block} stayed in float, as llama.cpp "
                      "keeps them." if left else ""))
    settings = {"format": fmt, "bits_per_weight": bits, "block_size": block, "embeddings": embeddings}
    return tampered_result(ctx, model, description, settings, report)


def absmax_attack(ctx: AttackContext, bits: int) -> dict:
    """Round-trip the weights through symmetric absmax `bits`-bit integers (a simulation) and audit."""
    s = ctx.settings
    group = None if bits == 8 else s.group_size
    model = ctx.weights_copy()
    report = quantize_model(model, lambda w: absmax_round_trip(w, bits, group)[0], s.quantize_embeddings)
    qmax = 2 ** (bits - 1) - 1
    grouping = "one scale per output row" if group is None else f"one scale per {group} weights of a row"
    description = (f"{_which(s.quantize_embeddings)} round-tripped through simulated symmetric absmax {bits}-bit "
                   f"integers (levels -{qmax}..{qmax}, {grouping}, float32 scales; w' = round(w / s) s, "
                   f"s = max|w| / {qmax})" + AUDITED + " Error per weight is at most s / 2.")
    settings = {"format": f"absmax int{bits}", "bits": bits, "group_size": group, "embeddings": s.quantize_embeddings}
    return tampered_result(ctx, model, description, settings, report)


def nf4_attack(ctx: AttackContext) -> dict:
    """Round-trip the weights through bitsandbytes NF4 and audit; skipped without CUDA or bitsandbytes."""
    embeddings = ctx.settings.quantize_embeddings
    description = (f"{_which(embeddings)} round-tripped through bitsandbytes NF4 (4.5 bits/weight: blocks of "
                   f"{NF4_BLOCK}, float32 absmax s, w' = s * the NF4 level nearest to w / s)" + AUDITED)
    settings = {"format": "NF4", "bits_per_weight": 4 + 32 / NF4_BLOCK, "block_size": NF4_BLOCK,
                "embeddings": embeddings}
    reason = nf4_unavailable()
    if reason:
        return skipped_result(description, settings, reason)
    model = ctx.weights_copy()
    report = quantize_model(model, nf4_round_trip, embeddings)
    return tampered_result(ctx, model, description, settings, report)
