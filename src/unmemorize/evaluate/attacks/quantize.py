"""Quantization attack: round the weights to few-bit integers and back, as a deployment would.

Unlearning can move weights by less than a quantization step; rounding them then lands near the
original, memorizing weights again (Zhang et al. 2024, "Catastrophic failure of LLM unlearning via
quantization"). Symmetric absmax quantization of a group of weights w_1..w_g with b bits:

    qmax  = 2^(b-1) - 1               (127 for 8 bits, 7 for 4 bits: levels -qmax..qmax, zero exact)
    scale = max_i |w_i| / qmax
    w'_i  = clamp(round(w_i / scale), -qmax, qmax) * scale

so |w_i - w'_i| <= scale / 2 for every weight. 8 bits: one group per output row (a row of a Linear weight,
one token's vector of an embedding). 4 bits: groups of `group_size` consecutive weights along the input
dimension (the last group of a row may be shorter). Every nn.Linear weight is quantized, and by default the
embeddings too (a tied output head is one tensor, quantized once). Biases and norms stay as they are.
The round trip is computed in float32 and stored in the weights' dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import AttackContext, audit_rows, counts, holdout_summary


def round_trip(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int | None, embeddings: bool = True) -> dict:
    """Round-trip the weights of `model` in place; return the error report."""
    seen: set[int] = set()
    max_error = max_bound = 0.0
    within, tensors, values = True, 0, 0
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    for module in model.modules():
        if not isinstance(module, kinds) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        weight = module.weight
        quantized, scale = round_trip(weight, bits, group_size)
        error = (weight.float() - quantized).abs()
        # float32 rounding of w / scale can add a few ulps beyond the exact bound.
        within &= bool((error <= scale / 2 * (1 + 1e-5) + 1e-12).all())
        max_error, max_bound = max(max_error, float(error.max())), max(max_bound, float(scale.max() / 2))
        weight.copy_(quantized.to(weight.dtype))
        tensors, values = tensors + 1, values + weight.numel()
    return {"tensors": tensors, "weights": values, "max_abs_error": max_error, "max_error_bound": max_bound,
            "within_bound": within}


def quantize_attack(ctx: AttackContext, bits: int) -> dict:
    s = ctx.settings
    group = None if bits == 8 else s.group_size
    model = ctx.weights_copy()
    report = quantize_model(model, bits, group, s.quantize_embeddings)
    forget = ctx.sets["forget"]
    result = ctx.audit(model, {"forget": forget, "holdout": ctx.sets["holdout"]})
    del model
    rows = audit_rows(ctx, result, forget)
    grouping = "one scale per output row" if group is None else f"one scale per {group} weights of a row"
    return {
        "description": f"Every linear weight{' and embedding' if s.quantize_embeddings else ''} round-tripped "
                       f"through symmetric absmax {bits}-bit integers (levels -{2 ** (bits - 1) - 1}.."
                       f"{2 ** (bits - 1) - 1}, {grouping}), then audited (EL off); the band is recalibrated on "
                       "the quantized model's holdout. Error per weight is at most its scale / 2.",
        "settings": {"bits": bits, "group_size": group, "embeddings": s.quantize_embeddings},
        **counts(rows),
        **report,
        **holdout_summary(result),
        "sequences": rows,
    }
