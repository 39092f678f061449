"""Weighted gradient ascent, WGA (Wang et al. 2025, "Rethinking LLM unlearning objectives: a gradient
perspective and go beyond", ICLR 2025, arXiv 2502.19301): ascent whose push on a token fades with its
probability.

    p[b,t] = p(x[b,t] | x[b,<t])
    w[b,t] = p[b,t] ** beta                                   (detached: a weight, not a term)
    loss   = (1 / N) * sum_{b,t} m[b,t] * w[b,t] * log p[b,t]          N = sum_{b,t} m[b,t]

over the predicted forget tokens (m: 1 on real tokens x_2..x_T, 0 on padding). Minimizing it lowers log p
as plain ascent (`ga`) does, but the gradient of a token is scaled by p^beta: a token the model still
predicts gets the full ascent step, one already unlikely gets almost none. In the paper's terms, the gradient
of a token is w * grad(p) / p = p^(beta - 1) * grad(p): at beta = 1 it is grad(p), without ascent's
inverse-confidence factor 1 / p that keeps pushing tokens already forgotten. beta = 0 is plain ascent.

The same loss as open-unlearning's `compute_wga_loss` (`src/trainer/utils.py`): a mean over the predicted
tokens of the batch. Default beta = 1, the paper's and open-unlearning's. The paper and open-unlearning
train with a retain NLL term (their GradDiff base): that is `wga_gd`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..context import PREDICTED_TOKENS, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class WGAConfig(MethodConfig):
    beta: float = Field(1.0, ge=0, description="Exponent of the token weight p^beta: larger beta stops pushing "
                        "tokens sooner as they become unlikely; 0 is plain ascent (range >= 0).")


class WGA(GradientMethod):
    Config = WGAConfig
    averages_over = PREDICTED_TOKENS

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        logprobs = ctx.token_logprobs(forget)
        mask = forget.target_mask
        weight = logprobs.detach().exp() ** self.config.beta
        return (weight * logprobs * mask).sum() / mask.sum()


SPECS = [
    MethodSpec("wga", "weighted gradient ascent: each token's push scaled by p^beta (Wang et al. 2025)", (WGA,),
               lr=2e-5),
    MethodSpec("wga_gd", "WGA on F + NLL on R (the paper's setting)", (WGA,), retain_loss="nll", lr=2e-5),
]
