"""Utility: does the model still work? Retain MA (training data it must keep) and general-text perplexity."""

from __future__ import annotations

import math

import numpy as np

from ..measure.scoring import score_tokens
from ..model import Runtime


def utility(model, retain_ids: list[list[int]] | None, general_ids: list[list[int]], runtime: Runtime,
            batch_size: int = 8, pad_id: int = 0) -> dict:
    """{"retain_ma", "retain_loss", "general_ppl"}: perplexity is exp of the token-weighted mean NLL."""
    result: dict = {"retain_ma": None, "retain_loss": None}
    if retain_ids:
        scores = score_tokens(model, retain_ids, runtime, batch_size, pad_id)
        result["retain_ma"] = float(np.mean([s.ma for s in scores]))
        result["retain_loss"] = float(np.mean([s.loss for s in scores]))
    scores = score_tokens(model, general_ids, runtime, batch_size, pad_id)
    nll = sum(-s.logprobs.sum() for s in scores) / sum(len(s.logprobs) for s in scores)
    result["general_ppl"] = float(math.exp(nll))
    return result


def utility_drop(before: dict, now: dict) -> float:
    """Largest relative degradation: retain MA falling or general perplexity rising."""
    drops = [now["general_ppl"] / before["general_ppl"] - 1]
    if before.get("retain_ma"):
        drops.append(1 - now["retain_ma"] / before["retain_ma"])
    return max(drops)
