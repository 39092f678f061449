"""Utility: does the model still work? Retain MA (training data it must keep) and general-text perplexity."""

from __future__ import annotations

import math

import numpy as np

from ..measure.scoring import score_tokens
from ..model import Runtime


def utility(model, retain_ids: list[list[int]] | None, general_ids: list[list[int]], runtime: Runtime,
            batch_size: int = 8, pad_id: int = 0, *, holdout_ids: list[list[int]] | None = None) -> dict:
    """{"retain_ma", "retain_loss", "general_ppl", "holdout_ppl"}: perplexities are token-weighted.

    `holdout_ppl` (None unless `holdout_ids` is given) tells whether unlearning also damaged unseen text of the
    forget set's own kind, which general text cannot show.
    """
    result: dict = {"retain_ma": None, "retain_loss": None}
    if retain_ids:
        scores = score_tokens(model, retain_ids, runtime, batch_size, pad_id)
        result["retain_ma"] = float(np.mean([s.ma for s in scores]))
        result["retain_loss"] = float(np.mean([s.loss for s in scores]))
    result["general_ppl"] = perplexity(model, general_ids, runtime, batch_size, pad_id)
    result["holdout_ppl"] = perplexity(model, holdout_ids, runtime, batch_size, pad_id) if holdout_ids else None
    return result


def perplexity(model, token_lists: list[list[int]], runtime: Runtime, batch_size: int = 8, pad_id: int = 0) -> float:
    """exp of the mean NLL over all predicted tokens: long sequences weigh more than short ones."""
    scores = score_tokens(model, token_lists, runtime, batch_size, pad_id)
    nll = sum(-s.logprobs.sum() for s in scores) / sum(len(s.logprobs) for s in scores)
    return float(math.exp(nll))


def utility_drop(before: dict, now: dict) -> float:
    """Largest relative degradation: retain MA falling or general perplexity rising."""
    drops = [now["general_ppl"] / before["general_ppl"] - 1]
    if before.get("retain_ma"):
        drops.append(1 - now["retain_ma"] / before["retain_ma"])
    return max(drops)
