"""SatImp (Yang et al. 2025, "Exploring criteria of loss reweighting to enhance LLM unlearning", ICML 2025,
arXiv 2505.11953): ascent on tokens weighted by both saturation and importance.

    p[b,t] = p(x[b,t] | x[b,<t])
    w[b,t] = p[b,t] ** beta1 * (1 - p[b,t]) ** beta2             (detached: a weight, not a term)
    loss   = (1 / N) * sum_{b,t} m[b,t] * w[b,t] * log p[b,t]          N = sum_{b,t} m[b,t]

over the predicted forget tokens (m: 1 on real tokens x_2..x_T, 0 on padding). Minimizing it lowers log p.
The saturation factor p^beta1 (as in `wga`) stops pushing tokens that are already unlikely; the importance
factor (1 - p)^beta2 puts less weight on the tokens the model finds trivially certain (p near 1), so the
push goes to the tokens that are neither. With the defaults the weight p^5 (1 - p) peaks at p = 5/6 (about
0.067 there): the gradient is far smaller than ascent's, but Adam (the loop's optimizer) rescales it, so
the learning rate, not the weight's size, sets the step; the weights set which tokens get it.
beta2 = 0 is `wga` with beta = beta1.

The same loss as open-unlearning's `compute_satimp_loss` (`src/trainer/utils.py`), a mean over the
predicted tokens of the batch; defaults beta1 = 5, beta2 = 1, the paper's (open-unlearning's SatImp README
and config; in the authors' code `hyper_param` is beta1 and `beta` is beta2). The paper trains with a retain
NLL term: that is `satimp_gd`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..context import PREDICTED_TOKENS, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class SatImpConfig(MethodConfig):
    beta1: float = Field(5.0, ge=0, description="Saturation exponent of the token weight p^beta1 (1-p)^beta2: "
                         "larger stops pushing unlikely tokens sooner (range >= 0).")
    beta2: float = Field(1.0, ge=0, description="Importance exponent of the token weight p^beta1 (1-p)^beta2: "
                         "larger weighs near-certain tokens less (range >= 0; 0 is wga).")


class SatImp(GradientMethod):
    Config = SatImpConfig
    averages_over = PREDICTED_TOKENS

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        logprobs = ctx.token_logprobs(forget)
        mask = forget.target_mask
        p, one_minus_p = logprobs.detach().exp(), -torch.expm1(logprobs.detach())  # 1 - p, exact near p = 1
        weight = p ** self.config.beta1 * one_minus_p ** self.config.beta2
        return (weight * logprobs * mask).sum() / mask.sum()


SPECS = [
    MethodSpec("satimp", "ascent with token weights p^beta1 (1-p)^beta2: saturation x importance "
               "(Yang et al. 2025)", (SatImp,), lr=2e-5),
    MethodSpec("satimp_gd", "SatImp on F + NLL on R (the paper's setting)", (SatImp,), retain_loss="nll", lr=2e-5),
]
