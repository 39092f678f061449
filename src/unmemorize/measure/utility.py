"""Utility: does the model still work? Retain MA (training data it must keep) and general-text perplexity."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..io.models import Runtime
from .scoring import lean_scores

if TYPE_CHECKING:  # audit imports the measures this module uses: typing only
    from .audit import AuditResult


class Scored(Protocol):
    """A scored sequence: a TokenScores, or an audit's row of the same sequence."""

    n_tokens: int
    ma: float
    loss: float


def utility(model, retain_ids: list[list[int]] | None, general_ids: list[list[int]], runtime: Runtime,
            batch_size: int = 8, pad_id: int = 0, *, holdout_ids: list[list[int]] | None = None,
            audited: AuditResult | None = None) -> dict:
    """{"retain_ma", "retain_loss", "general_ppl", "holdout_ppl"}: perplexities are token-weighted.

    `holdout_ppl` (None unless `holdout_ids` is given) tells whether unlearning also damaged unseen text of the
    forget set's own kind, which general text cannot show. `audited`: an audit of this same model over the same
    retain and holdout sequences; its rows stand in for scoring those sets again.
    """

    def scored(name: str, ids: list[list[int]] | None) -> list[Scored] | None:
        if not ids:
            return None
        if audited is not None and name in audited.set_names():
            return audited.of(name)
        return lean_scores(model, ids, runtime, batch_size, pad_id)

    retain, holdout = scored("retain", retain_ids), scored("holdout", holdout_ids)
    return {
        "retain_ma": float(np.mean([s.ma for s in retain])) if retain else None,
        "retain_loss": float(np.mean([s.loss for s in retain])) if retain else None,
        "general_ppl": perplexity_of(lean_scores(model, general_ids, runtime, batch_size, pad_id)),
        "holdout_ppl": perplexity_of(holdout) if holdout else None,
    }


def perplexity_of(scores: list[Scored]) -> float:
    """exp of the mean NLL over all predicted tokens: long sequences weigh more than short ones."""
    predicted = [s.n_tokens - 1 for s in scores]
    nll = sum(s.loss * n for s, n in zip(scores, predicted, strict=True)) / sum(predicted)
    return float(math.exp(nll))


def utility_drop(before: dict, now: dict) -> float:
    """Largest relative degradation: retain MA falling or general perplexity rising."""
    drops = [now["general_ppl"] / before["general_ppl"] - 1]
    if before.get("retain_ma"):
        drops.append(1 - now["retain_ma"] / before["retain_ma"])
    return max(drops)
