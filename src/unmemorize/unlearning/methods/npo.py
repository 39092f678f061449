"""Negative preference optimization (Zhang et al. 2024): ascent that slows down by itself.

    loss = -(2 / beta) * (1 / B) * sum_i log sigmoid(-beta * (log pi(x_i) - log pi_ref(x_i)))

over the B forget sequences of the batch, with log pi(x_i) = sum_t log p(x_i,t | x_i,<t) the sequence
log-likelihood under the model and pi_ref the original model. As a sequence's likelihood falls below the
original's the gradient fades, unlike plain ascent that diverges; as beta -> 0 the loss tends to ascent on
the sequence log-likelihood (up to a constant). The original model's sequence log-likelihoods are computed
once before training, so no second model stays in memory. `npo_gd`, `npo_kl` add a retain regularizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ...measure.scoring import score_tokens
from ..context import SEQUENCES, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class NPOConfig(MethodConfig):
    beta: float = Field(0.1, gt=0, description="Inverse temperature: larger beta saturates sooner (more "
                        "conservative).")


class NPO(GradientMethod):
    Config = NPOConfig
    averages_over = SEQUENCES

    def __init__(self, config: NPOConfig | None = None, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        self.reference: torch.Tensor | None = None

    def prepare(self, ctx: Context) -> None:
        """log pi_ref(x_i): the audit's scores of the input model when the weights are still those (`ctx.before`),
        else one scoring pass now."""
        scores = ctx.before.get("forget") if not ctx.changed else None
        if scores is None:
            scores = score_tokens(ctx.model, ctx.forget_ids, ctx.runtime, pad_id=ctx.pad_id)
        self.reference = torch.tensor([float(s.logprobs.sum()) for s in scores], device=ctx.runtime.device)

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        beta = self.config.beta
        ratio = ctx.sequence_logprobs(forget) - self.reference[forget.indices]
        return -(2 / beta) * F.logsigmoid(-beta * ratio).mean()


SPECS = [
    MethodSpec("npo", "negative preference optimization against the original model (Zhang et al. 2024)", (NPO,),
               lr=2e-5),
    MethodSpec("npo_gd", "NPO on F + NLL on R", (NPO,), retain_loss="nll"),
    MethodSpec("npo_kl", "NPO on F + KL to the original model on R", (NPO,), retain_loss="kl"),
]
