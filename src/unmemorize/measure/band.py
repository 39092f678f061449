"""The band of "looks unseen", calibrated on the holdout MA of the model being measured, and statuses.

An attacker compares a sequence with unseen data under the same model, so the band always comes from the
holdout as the current model sees it (unlearning lowers memorization of unseen text too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

EXTRACTABLE, IN_BAND, OVER_UNLEARNED = "extractable", "in_band", "over_unlearned"
DEFAULT_RULE = "quantile:0.05,0.95"


@dataclass(frozen=True)
class Band:
    rule: str
    lower: float | None
    upper: float
    n: int

    def status(self, ma: float) -> str:
        if ma > self.upper:
            return EXTRACTABLE
        if self.lower is not None and ma < self.lower:
            return OVER_UNLEARNED
        return IN_BAND

    def to_json(self) -> dict:
        return {"rule": self.rule, "lower": self.lower, "upper": self.upper, "calibrated_on": "holdout", "n": self.n}


def check_rule(rule: str) -> str:
    """Validate a --band rule: `quantile:LO,HI`, `meanstd:K` or `mean`."""
    kind, _, args = rule.partition(":")
    try:
        if kind == "quantile":
            lo, hi = (float(v) for v in args.split(","))
            if not 0 <= lo < hi <= 1:
                raise ValueError
        elif kind == "meanstd":
            if float(args) < 0:
                raise ValueError
        elif kind != "mean" or args:
            raise ValueError
    except ValueError:
        raise InputError(f"--band {rule!r}: expected quantile:LO,HI (0<=LO<HI<=1), meanstd:K (K>=0) or mean") from None
    return rule


def calibrate(rule: str, holdout_ma: Sequence[float]) -> Band:
    values = np.asarray(holdout_ma, dtype=float)
    kind, _, args = check_rule(rule).partition(":")
    if kind == "quantile":
        lo, hi = (float(v) for v in args.split(","))
        # numpy's default (linear) interpolation, as SPEC fixes it.
        lower, upper = float(np.quantile(values, lo)), float(np.quantile(values, hi))
    elif kind == "meanstd":
        k, mean, std = float(args), float(values.mean()), float(values.std())  # population std (ddof=0)
        lower, upper = mean - k * std, mean + k * std
    else:  # "mean": the aggregate rule of Jang et al., no lower bound
        lower, upper = None, float(values.mean())
    return Band(rule, lower, upper, len(values))
