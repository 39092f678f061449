"""Gradient ascent (Jang et al. 2022): push the likelihood of the forget tokens down.

    loss = mean_{forget tokens} log p(x_t | x_<t)        (minimizing it raises the NLL)

`ga` applies it to every forget sequence until the stop rule; `sga` (selective gradient ascent,
Barbulescu & Triantafillou 2024) only to the sequences still above the band, so a sequence stops being
pushed as soon as it looks like unseen data and is never driven below the band.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Batch, Context


@dataclass
class AscentConfig:
    """Gradient ascent has no parameters of its own: the learning rate and selection do the work."""


class Ascent:
    def __init__(self, config: AscentConfig | None = None) -> None:
        self.config = config or AscentConfig()

    def prepare(self, ctx: Context) -> None:
        """Nothing to precompute."""

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        logprobs = ctx.token_logprobs(forget)
        return logprobs.sum() / forget.target_mask.sum()
