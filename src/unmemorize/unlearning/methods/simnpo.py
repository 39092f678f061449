"""SimNPO (Fan et al. 2024, "Simplicity prevails: rethinking negative preference optimization for LLM
unlearning", arXiv 2410.07163, Eq. 4): NPO without the reference model, on the mean
log-likelihood per token.

    loss = -(2 / beta) * (1 / B) * sum_i log sigmoid(-(beta / |y_i|) * log pi(y_i) - gamma)

over the B forget sequences of the batch, with log pi(y_i) = sum_t log p(x_i,t | x_i,<t) the sequence
log-likelihood under the current model and |y_i| the number of tokens it predicts (x_2..x_T: one less than
the sequence's length). There is no pi_ref: a sequence's push fades as its own mean log-probability falls,
not as it falls below the original's, so long and short sequences (and well or weakly memorized ones) are
treated alike. The per-sequence gradient weight is 2 * sigmoid((beta / |y_i|) * log pi(y_i) + gamma) <= 2:
about 1 on a memorized sequence (mean log-prob near 0, gamma = 0), tending to 0 as it is forgotten, so the
loss is bounded below by 0, unlike ascent.

gamma here is the paper's margin (outside beta). open-unlearning (`src/trainer/unlearn/simnpo.py`) writes
the same loss with a `delta` inside: log sigmoid(beta * (NLL_i / |y_i| - delta)), i.e. gamma = beta * delta;
with the default 0 the two agree. Defaults: beta = 2.5, gamma = 0, the authors' TOFU setting (their released
SimNPO TOFU forget05 model; open-unlearning's TOFU config uses beta 4.5). `simnpo_gd` adds the retain NLL the
paper trains with; `ssimnpo` applies the loss only to the sequences still above the band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..context import SEQUENCES, Batch, Context
from .base import BAND, GradientMethod, MethodConfig, MethodSpec


class SimNPOConfig(MethodConfig):
    beta: float = Field(2.5, gt=0, description="Inverse temperature on the mean token log-probability: larger "
                        "beta saturates sooner (range > 0).")
    gamma: float = Field(0.0, ge=0, description="Reward margin: larger gamma keeps pushing a sequence longer "
                         "before the loss saturates (range >= 0).")


class SimNPO(GradientMethod):
    Config = SimNPOConfig
    averages_over = SEQUENCES

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        beta, gamma = self.config.beta, self.config.gamma
        lengths = forget.target_mask.sum(-1)  # |y_i|: predicted tokens (every sequence has at least 2 tokens)
        mean_logprob = ctx.sequence_logprobs(forget) / lengths
        return -(2 / beta) * F.logsigmoid(-beta * mean_logprob - gamma).mean()


SPECS = [
    MethodSpec("simnpo", "reference-free, length-normalized NPO (Fan et al. 2024)", (SimNPO,), lr=2e-5),
    MethodSpec("simnpo_gd", "SimNPO on F + NLL on R (the paper's setting)", (SimNPO,), retain_loss="nll", lr=2e-5),
    MethodSpec("ssimnpo", "SimNPO only on the sequences above the band", (SimNPO,), selection=BAND, lr=2e-5),
]
