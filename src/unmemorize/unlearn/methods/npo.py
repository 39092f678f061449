"""Negative preference optimization (Zhang et al. 2024): ascent that slows down by itself.

    loss = -(2 / beta) * mean_i log sigmoid(-beta * (log pi(x_i) - log pi_ref(x_i)))

with log pi(x_i) the sequence log-likelihood under the model and pi_ref the original model. As a sequence's
likelihood falls below the original's the gradient fades, unlike plain ascent that diverges. The original
model's sequence log-likelihoods are computed once before training, so no second model stays in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...measure.scoring import score_tokens
from ..context import Batch, Context


@dataclass
class NPOConfig:
    beta: float = 0.1
    """Inverse temperature: larger beta saturates sooner (more conservative)."""


class NPO:
    def __init__(self, config: NPOConfig | None = None) -> None:
        self.config = config or NPOConfig()
        self.reference: torch.Tensor | None = None

    def prepare(self, ctx: Context) -> None:
        scores = score_tokens(ctx.model, ctx.forget_ids, ctx.runtime, pad_id=ctx.pad_id)
        self.reference = torch.tensor([float(s.logprobs.sum()) for s in scores], device=ctx.runtime.device)

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        beta = self.config.beta
        ratio = ctx.sequence_logprobs(forget) - self.reference[forget.indices]
        return -(2 / beta) * F.logsigmoid(-beta * ratio).mean()
