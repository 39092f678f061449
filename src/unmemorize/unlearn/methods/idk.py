"""IdK (Maini et al. 2024, TOFU): teach the model to answer a forget prefix with a neutral refusal.

    loss = mean NLL of the refusal tokens r given the forget prefix x_1..x_P

The forget text itself gets no gradient; its likelihood falls because the prefix now leads elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import Batch, Context


@dataclass
class IdkConfig:
    refusal: str = " I'm sorry, I can't share that information."
    """The continuation the model learns to give after a forget prefix."""
    prefix_tokens: int = 16
    """Prefix length P kept from each forget sequence (capped at half the sequence)."""


class Idk:
    def __init__(self, config: IdkConfig | None = None, tokenizer=None) -> None:
        self.config = config or IdkConfig()
        self.tokenizer = tokenizer
        self.examples: list[list[int]] = []
        self.prefix_lengths: list[int] = []

    def prepare(self, ctx: Context) -> None:
        refusal = self.tokenizer(self.config.refusal, add_special_tokens=False)["input_ids"]
        self.examples, self.prefix_lengths = [], []
        for ids in ctx.forget_ids:
            prefix = min(self.config.prefix_tokens, len(ids) // 2)
            self.examples.append([*ids[:prefix], *refusal])
            self.prefix_lengths.append(prefix)

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        batch = Batch.of(self.examples, forget.indices, ctx.pad_id, ctx.runtime.device)
        logprobs = ctx.token_logprobs(batch)
        # Only the refusal counts: logprobs[:, t-1] scores token t, the refusal starts at token P.
        positions = torch.arange(logprobs.size(1), device=logprobs.device)[None, :]
        starts = torch.tensor([self.prefix_lengths[i] - 1 for i in forget.indices], device=logprobs.device)
        weight = (positions >= starts[:, None]).float() * batch.target_mask
        return -(logprobs * weight).sum() / weight.sum()
