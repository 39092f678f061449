"""UNDIAL (Dong et al. 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
Language Models", NAACL 2025, arXiv 2402.10052): distil the model into itself, with the memorized token made
less likely in the teacher.

    z0_t  = logits of the ORIGINAL model at position t (frozen)
    q_t   = softmax(z0_t - strength * onehot(x_t+1))          the adjusted teacher: true token pushed down
    loss  = (1 / N) * sum_{b,t} m[b,t] * CE(q_t, p_t)
          = (1 / N) * sum_{b,t} m[b,t] * -sum_v q_t(v) * log p(v | x[b,<=t])

over the N predicted forget tokens (m: 1 on real tokens x_2..x_T, 0 on padding), p the current model. The
target is fixed: once the model matches q the loss stops falling (it is bounded below by the teacher's
entropy H(q_t); KL(q_t || p_t) = CE - H(q_t) has the same gradient), so unlike ascent nothing diverges. Every
token other than the true one keeps its original relative probability: the model is taught what to say
instead, not merely what not to say.

The teacher is the input model, kept frozen (`Context.keep_original`, the copy the kl retain regularizer
uses); its logits are computed on the fly under no_grad, as open-unlearning (`compute_undial_loss` in
`src/trainer/utils.py`) does. Departure: open-unlearning averages over every position of the batch, padding
and prompt tokens included; here only the predicted real tokens count. Default strength 10 (the value the
paper and open-unlearning's TOFU config use; the paper searches 3, 10, 30). The paper trains with no retain
set, so `undial` has no retain regularizer by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...measure.scoring import forward_logits
from ..context import PREDICTED_TOKENS, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class UndialConfig(MethodConfig):
    strength: float = Field(10.0, gt=0, description="How much the true next token's logit is lowered in the "
                            "teacher (range > 0; the paper tries 3, 10, 30).")


class Undial(GradientMethod):
    Config = UndialConfig
    averages_over = PREDICTED_TOKENS

    def prepare(self, ctx: Context) -> None:
        ctx.keep_original()  # the teacher: the model as it is before the first step

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        targets = forget.input_ids[:, 1:, None]
        logits = forward_logits(ctx.model, forget.input_ids, forget.mask, ctx.runtime)[:, :-1].float()
        with torch.no_grad():
            teacher = forward_logits(ctx.original, forget.input_ids, forget.mask, ctx.runtime)[:, :-1].float()
            lowered = torch.full(targets.shape, -self.config.strength, device=teacher.device)
            target = torch.softmax(teacher.scatter_add(-1, targets, lowered), -1)
        per_token = -(target * F.log_softmax(logits, -1)).sum(-1)
        mask = forget.target_mask
        return (per_token * mask).sum() / mask.sum()


SPECS = [
    MethodSpec("undial", "self-distillation toward the original model with the true token's logit lowered "
               "(Dong et al. 2025)", (Undial,), lr=2e-5),
]
