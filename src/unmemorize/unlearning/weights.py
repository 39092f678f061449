"""Which weights a gradient method trains: LoRA adapters, the method's own subset, or all; optionally only the
MLPs of the layers causal tracing ranks first (`--localize causal:K`, `localize.py`) and only the fraction with the
largest forget gradient (`--mask-fraction`); and folding adapters back in afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..io.notes import note
from ..measure.tracing import traceable
from .context import Batch, Context, TokenSets
from .localize import check_trainable, localized_layers, restrict_to_mlps

if TYPE_CHECKING:
    from .config import LoopSettings


def trainable(ctx: Context, objective, settings: LoopSettings, tokens: TokenSets, work: Path | None = None,
              main: bool = True):
    """(model, the parameters to train, gradient masks): LoRA adapters, the method's own subset
    (`objective.trainable`), or all, optionally restricted to the MLPs of the layers causal tracing ranks first
    (`--localize`; the tracing is written to `work` by the `main` process) and to the fraction of weights with the
    largest forget gradient (`--mask-fraction`)."""
    model = ctx.model
    layers = None
    localize = settings.localized
    if localize and not traceable(model):
        if settings.localize_given:
            raise InputError(f"--localize {localize}: the model's decoder layers hold no MLP module to trace and "
                             "train (OPT's fc1 and fc2, for one); use --localize none")
        note(f"{settings.method}'s default --localize {localize}: the model's decoder layers hold no MLP module to "
             "trace; every layer trains")
        localize = None
    if localize:  # traced on the model as it is, before any adapter
        audit = settings.audit
        layers = localized_layers(ctx, localize, tokens, audit.prefix_tokens, settings.seed,
                                  audit.batch_size, work, main)
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings.lora, lora_alpha=2 * settings.lora, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        ctx.model = model
    chosen = None if settings.lora else objective.trainable(model)
    if chosen is not None:
        keep = {id(p) for p in chosen}
        for param in model.parameters():
            param.requires_grad_(id(param) in keep)
    if layers is not None:
        restrict_to_mlps(model, layers)
    params = [p for p in model.parameters() if p.requires_grad]
    if layers is not None:
        check_trainable(params, localize, layers)
    grad_mask = forget_gradient_mask(ctx, objective, params, tokens, settings) if settings.mask_fraction else None
    return model, params, grad_mask


def forget_gradient_mask(ctx: Context, objective, params, tokens: TokenSets, settings: LoopSettings):
    """1 for the `mask_fraction` of weights with the largest |d forget loss / d w|, 0 elsewhere."""
    objective.prepare(ctx)
    batch = Batch.of(tokens.forget, list(range(len(tokens.forget))), ctx.pad_id, ctx.runtime.device)
    ctx.model.zero_grad(set_to_none=True)
    objective.loss(ctx, batch, None).backward()
    magnitudes = torch.cat([p.grad.abs().flatten() for p in params if p.grad is not None])
    keep = max(1, int(settings.mask_fraction * magnitudes.numel()))
    threshold = torch.topk(magnitudes, keep, sorted=False).values.min()
    masks = {p: (p.grad.abs() >= threshold).to(p.dtype) for p in params if p.grad is not None}
    ctx.model.zero_grad(set_to_none=True)
    return masks


def merge(model):
    """Fold LoRA adapters into the weights so the saved checkpoint is a plain model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
