"""CE-U, cross entropy unlearning (Yang et al. 2025, "CE-U: Cross Entropy Unlearning", arXiv 2503.01224):
cross entropy against the model's own prediction with the true token taken out.

    z_t   = logits of the current model at position t
    q_t   = softmax(z_t with z_t[x_t+1] set to -inf), detached     (the model's own guess, true token excluded)
    loss  = (1 / N) * sum_{b,t} m[b,t] * CE(q_t, p_t)
          = (1 / N) * sum_{b,t} m[b,t] * -sum_{v != x_t+1} q_t(v) * log p(v | x[b,<=t])

over the N predicted forget tokens (m: 1 on real tokens x_2..x_T, 0 on padding). q_t(v) = p_t(v) / (1 - p_t(y))
for v != y = x_t+1, so each term equals H(q_t) - log(1 - p_t(y)): with q held fixed its gradient is that of
-log(1 - p_t(y)), which pushes the true token's probability to 0 and is bounded below by 0 (it vanishes as
p_t(y) -> 0, unlike ascent's -log p that diverges). The other tokens keep their relative probabilities.

As open-unlearning's `cross_entropy_unlearning_loss` (`src/trainer/unlearn/ceu.py`), a mean over the
predicted tokens. Departure: open-unlearning (following the paper's training note) also skips the first
answer token of each TOFU question-answer pair (`ignore_first_n_answer_tokens`); a forget sequence here is
plain text with no answer part, so every predicted token counts. No options; no retain regularizer by default
(the paper's CE-U alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...measure.scoring import forward_logits
from ..context import PREDICTED_TOKENS, Batch, Context
from .base import GradientMethod, MethodConfig, MethodSpec


class CEUConfig(MethodConfig):
    """CE-U has no options of its own: the learning rate and selection do the work."""


class CEU(GradientMethod):
    Config = CEUConfig
    averages_over = PREDICTED_TOKENS

    def loss(self, ctx: Context, forget: Batch, retain: Batch | None) -> torch.Tensor:
        targets = forget.input_ids[:, 1:, None]
        logits = forward_logits(ctx.model, forget.input_ids, forget.mask, ctx.runtime)[:, :-1].float()
        with torch.no_grad():
            target = torch.softmax(logits.detach().scatter(-1, targets, float("-inf")), -1)
        per_token = -(target * F.log_softmax(logits, -1)).sum(-1)
        mask = forget.target_mask
        return (per_token * mask).sum() / mask.sum()


SPECS = [
    MethodSpec("ce_u", "cross entropy toward the model's own prediction with the true token removed "
               "(Yang et al. 2025)", (CEU,), lr=2e-5),
]
