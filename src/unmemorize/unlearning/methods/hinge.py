"""Two-way hinge on the loss band: push each blocking sequence's loss up into the band, pull each over-unlearned
one back down into it, and leave a sequence alone once it is there.

For each selected forget sequence i, with l_i its mean token NLL (a mean over its predicted tokens x_2..x_T),
[lo, hi] the loss band of the current calibration (the holdout under the current model), c = (lo + hi) / 2:

    forget     (d_i = +1: MA above the band, verbatim, or loss under lo):
                   h_i = relu(t_i - l_i),   t_i = c if l_i < c else hi'
    pull back  (d_i = -1: loss above hi, over-unlearned):
                   h_i = relu(l_i - c)

    loss = (1 / B) * sum_i h_i           over the B selected sequences of the batch

with hi' = hi - margin * (hi - lo) (the middle c stays put). A sequence still extractable on MA although its
loss passed the middle is pushed up to hi', never beyond; under the `mean` band rule (no upper edge, no margin)
the only target is lo: h_i = relu(lo - l_i) (and relu(l_i - lo) to pull back, which that rule never asks).
The loss is zero inside the targets, so unlike ascent it cannot run away: a sequence overshoots its target by
at most one optimizer step, and one pushed over the band is pulled back. Selection `two_way`
(`target.TWO_WAY`): the loop gives the direction d_i of every selected sequence and the bands in `ctx.step`.
Unseen in-domain text is kept as it was by the loop-level `--neighbours` KL (any method), not by this loss.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..context import SEQUENCES, Batch, Context
from .base import TWO_WAY, GradientMethod, MethodConfig, MethodSpec


class HingeConfig(MethodConfig):
    margin: float = Field(0.0, ge=0, lt=0.5, description="Fraction of the loss band's width kept away from its "
                          "upper edge: the forget target hi becomes hi - margin * (hi - lo); 0 aims at the edge "
                          "itself. Unused under the mean band rule (no hi).")


class Hinge(GradientMethod):
    Config = HingeConfig
    averages_over = SEQUENCES

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        if ctx.step is None:
            raise RuntimeError("hinge needs the loop's step state (ctx.step): the bands and each direction")
        nll = -ctx.token_logprobs(forget).sum(-1) / forget.target_mask.sum(-1)  # l_i, a mean per sequence
        direction = torch.tensor(ctx.step.directions_of(forget), device=nll.device)
        lo, hi = hinge_edges(ctx.step.loss_band.lower, ctx.step.loss_band.upper, self.config.margin)
        value = nll.detach()
        if hi is None:  # the mean rule: lo is the only target
            forget_target = torch.full_like(value, lo)
            middle = torch.full_like(value, lo)
        else:
            middle = torch.full_like(value, (lo + hi) / 2)
            forget_target = torch.where(value < middle, middle, torch.full_like(value, hi))
        pushed = torch.relu(forget_target - nll)
        pulled = torch.relu(nll - middle)
        return torch.where(direction > 0, pushed, pulled).mean()


def hinge_edges(lower: float, upper: float | None, margin: float) -> tuple[float, float | None]:
    """(lo', hi') of the loss band with `margin` of its width kept away from each edge (the middle stays put);
    (lower, None) under the mean rule."""
    if upper is None:
        return lower, None
    width = upper - lower
    return lower + margin * width, upper - margin * width


SPECS = [
    MethodSpec("hinge", "two-way hinge on the loss band: push blocking sequences into it, pull over-unlearned "
               "ones back, zero inside (bounded)", (Hinge,), selection=TWO_WAY, retain_loss="nll", lr=1e-4),
]
