"""IdK (Maini et al. 2024, TOFU): teach the model to answer a forget prefix with a neutral refusal.

    loss = -(1 / N) * sum_{b} sum_{t >= P_b + 1} log p(y[b,t] | y[b,<t])

where y_b = (x_b,1 .. x_b,P_b, r_1 .. r_R) is forget sequence b's prefix of P_b tokens followed by the
refusal r, and N the number of refusal tokens in the batch: the mean NLL of the refusal tokens only. The
forget text itself gets no gradient; its likelihood falls because the prefix now leads elsewhere. The loss is
a mean over sequences as much as over tokens (the refusal has the same length R for every sequence).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..context import SEQUENCES, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class IdkConfig(MethodConfig):
    refusal: str = Field(" I'm sorry, I can't share that information.", min_length=1,
                         description="The continuation the model learns to give after a forget prefix.")
    prefix_tokens: int = Field(16, ge=1, description="Prefix length P kept from each forget sequence (capped at "
                               "half the sequence).")


class Idk(GradientMethod):
    Config = IdkConfig
    averages_over = SEQUENCES

    def __init__(self, config: IdkConfig | None = None, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
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


SPECS = [
    MethodSpec("idk", "train forget prefixes toward a neutral refusal, NLL on R (TOFU)", (Idk,), retain_loss="nll",
               lr=5e-5),
]
