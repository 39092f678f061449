"""Retain regularizers: keep the model as it was on data it must not forget.

    nll: mean NLL of retain tokens                             (gd, npo_gd: keep fitting them)
    kl:  mean over retain tokens of KL(p_orig(.|x_<t) || p(.|x_<t))   (ga_kl, npo_kl: stay close)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..measure.scoring import forward_logits
from .context import Batch, Context

RETAIN_LOSSES = ("none", "nll", "kl")


def retain_loss(kind: str, ctx: Context, batch: Batch) -> torch.Tensor:
    if kind == "nll":
        return -ctx.token_logprobs(batch).sum() / batch.target_mask.sum()
    if kind == "kl":
        logits = forward_logits(ctx.model, batch.input_ids, batch.mask, ctx.runtime)[:, :-1].float()
        with torch.no_grad():
            original = forward_logits(ctx.original, batch.input_ids, batch.mask, ctx.runtime)[:, :-1].float()
        per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(original, -1), log_target=True,
                             reduction="none").sum(-1)
        return (per_token * batch.target_mask).sum() / batch.target_mask.sum()
    raise ValueError(f"unknown retain loss {kind!r}")
