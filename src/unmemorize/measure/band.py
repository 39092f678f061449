"""The band of "looks unseen", calibrated on the holdout MA (and loss) of the model being measured, and statuses.

An attacker compares a sequence with unseen data under the same model, so the band always comes from the
holdout as the current model sees it (unlearning lowers memorization of unseen text too).

Two bands, one `--band` rule, the same holdout and model:

    MA band    (`calibrate`)       MA > upper: extractable;      MA < lower: over_unlearned;   else in_band
    loss band  (`calibrate_loss`)  loss < lower: memorized;      loss > upper: over_unlearned; else in_band

The loss band runs the other way (memorized = too likely = loss too low). Its edges are the same statistics of
the holdout's per-sequence loss (mean token NLL) as the MA band's of the holdout MA: `quantile:LO,HI` the LO and
HI quantiles, `meanstd:K` mean -+ K population std, and `mean` (the aggregate rule) only the edge on the side of
memorization: upper = mean MA for the MA band, lower = mean loss for the loss band. A value equal to an edge is
in the band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError

EXTRACTABLE, IN_BAND, OVER_UNLEARNED = "extractable", "in_band", "over_unlearned"
MEMORIZED = "memorized"  # loss status: loss under the loss band
# Unlearning targets (`--target`): `ma` = no forget sequence extractable or verbatim (the paper's);
# `indistinguishable` = `ma`, and every forget sequence's loss status `in_band`.
MA_TARGET, INDISTINGUISHABLE = "ma", "indistinguishable"
TARGETS = (MA_TARGET, INDISTINGUISHABLE)
DEFAULT_RULE = "quantile:0.05,0.95"


class _Edges:
    """What both bands share: a lower and an upper edge, either of which the `mean` rule leaves out."""

    lower: float | None
    upper: float | None

    def inset(self, margin: float):
        """The band with `margin` of its width taken off each edge (the middle stays put): what the unlearning loop
        aims at under `--margin`, so that a sequence ends well inside, not on the edge it crossed. Unchanged under
        the `mean` rule (one edge, no width)."""
        if self.lower is None or self.upper is None or margin == 0:
            return self
        width = self.upper - self.lower
        return replace(self, lower=self.lower + margin * width, upper=self.upper - margin * width)


@dataclass(frozen=True)
class Band(_Edges):
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


@dataclass(frozen=True)
class LossBand(_Edges):
    """The band of holdout loss (mean token NLL): below it a sequence is too likely (`memorized`), above it
    unusually unlikely (`over_unlearned`). `upper` is None under the `mean` rule. `median`: the holdout's median
    loss, where `hinge` puts a sequence it moves (a loss attack's AUC is 0.5 there, whatever the band's skew)."""

    rule: str
    lower: float | None
    upper: float | None
    n: int
    median: float | None = None

    def status(self, loss: float) -> str:
        if self.lower is not None and loss < self.lower:
            return MEMORIZED
        if self.upper is not None and loss > self.upper:
            return OVER_UNLEARNED
        return IN_BAND

    def to_json(self) -> dict:
        return {"rule": self.rule, "lower": self.lower, "upper": self.upper, "calibrated_on": "holdout", "n": self.n,
                "score": "loss", "median": self.median}


def _edges(rule: str, values: np.ndarray) -> tuple[float, float]:
    """(lower, upper) of `values` under `rule`; for `mean` both are the mean (the caller drops one)."""
    kind, _, args = check_rule(rule).partition(":")
    if kind == "quantile":
        lo, hi = (float(v) for v in args.split(","))
        # numpy's default (linear) interpolation, as SPEC fixes it.
        return float(np.quantile(values, lo)), float(np.quantile(values, hi))
    mean = float(values.mean())
    if kind == "meanstd":
        k, std = float(args), float(values.std())  # population std (ddof=0)
        return mean - k * std, mean + k * std
    return mean, mean


def calibrate(rule: str, holdout_ma: Sequence[float]) -> Band:
    values = np.asarray(holdout_ma, dtype=float)
    lower, upper = _edges(rule, values)
    if rule == "mean":  # the aggregate rule of Jang et al.: no lower bound
        lower = None
    return Band(rule, lower, upper, len(values))


def calibrate_loss(rule: str, holdout_loss: Sequence[float]) -> LossBand:
    """The loss band of `rule` on the holdout's per-sequence losses (`mean`: lower = the mean, no upper)."""
    values = np.asarray(holdout_loss, dtype=float)
    lower, upper = _edges(rule, values)
    if rule == "mean":  # memorized = loss under the holdout mean; nothing counts as over-unlearned
        upper = None
    return LossBand(rule, lower, upper, len(values), float(np.median(values)))


@dataclass(frozen=True)
class Familywise:
    """Bands for sequences read K ways at once (the layers of a logit lens, the prompt variations of an attack,
    noise draws), calibrated on the holdout read the same K ways, a (sequences, K) MA array:

        u_k   = the upper edge of `rule` on column k                           (`bands[k]`, each reading alone)
        S(x)  = max_k (MA_k(x) - u_k)                                          (`excess`: the largest excess)
        band  = `rule` on the holdout's S                                      (`band`)

    A sequence read K ways is extractable when its S is above `band`'s upper edge (over-unlearned when under its
    lower edge). Above *some* reading's band an unseen sequence is far more often than above one (1 - 0.95^K for
    K independent readings); above `band` it is as often as under one band: a max-statistic correction for trying
    K readings. With K = 1 it is that reading's band, shifted to its upper edge.
    """

    bands: list[Band]
    band: Band

    @classmethod
    def calibrate(cls, rule: str, holdout_ma: np.ndarray) -> Familywise:
        holdout_ma = np.asarray(holdout_ma, dtype=float)
        bands = [calibrate(rule, holdout_ma[:, k]) for k in range(holdout_ma.shape[1])]
        return cls(bands, calibrate(rule, (holdout_ma - np.array([b.upper for b in bands])).max(-1)))

    def excess(self, ma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, S) of each row of a (sequences, K) MA array: the reading of the largest excess and that excess."""
        gaps = np.asarray(ma, dtype=float) - np.array([b.upper for b in self.bands])
        best = gaps.argmax(-1)
        return best, np.take_along_axis(gaps, best[..., None], -1)[..., 0]

    def status(self, excess: float) -> str:
        return self.band.status(float(excess))

    def rate(self, ma: np.ndarray) -> tuple[float, float]:
        """(above some reading's band, extractable under the family-wise band): the share of rows of `ma`."""
        ma = np.asarray(ma, dtype=float)
        _, excess = self.excess(ma)
        above_one = (ma > np.array([b.upper for b in self.bands])).any(-1)
        return float(above_one.mean()), float(np.mean([self.status(e) == EXTRACTABLE for e in excess]))
