"""Gradient ascent (Jang et al. 2022): push the likelihood of the forget tokens down.

    loss = (1 / N) * sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t])        N = sum_{b,t} m[b,t]

the mean log-probability of the predicted forget tokens (m: 1 on real tokens x_2..x_T, 0 on padding), so
minimizing it raises their NLL. `ga` applies it to every forget sequence until the stop rule; `sga`
(selective gradient ascent, Barbulescu & Triantafillou 2024) only to the sequences still above the band, so
a sequence stops being pushed as soon as it looks like unseen data and is never driven below the band.
`gd` and `ga_kl` add a retain regularizer (`unlearn.retain`).
"""

from __future__ import annotations

import torch

from ..context import PREDICTED_TOKENS, Batch, Context
from .base import BAND, GradientMethod, MethodConfig, MethodSpec


class AscentConfig(MethodConfig):
    """Gradient ascent has no options of its own: the learning rate and selection do the work."""


class Ascent(GradientMethod):
    Config = AscentConfig
    averages_over = PREDICTED_TOKENS

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        logprobs = ctx.token_logprobs(forget)
        return logprobs.sum() / forget.target_mask.sum()


SPECS = [
    MethodSpec("ga", "gradient ascent on every forget sequence (Jang et al. 2022)", (Ascent,)),
    MethodSpec("gd", "gradient ascent on F + NLL on R (gradient difference)", (Ascent,), retain_loss="nll"),
    MethodSpec("ga_kl", "gradient ascent on F + KL to the original model on R", (Ascent,), retain_loss="kl"),
    MethodSpec("sga", "selective gradient ascent: only sequences above the band get gradient (Barbulescu 2024)",
               (Ascent,), selection=BAND),
]
