"""The target of unlearning and the rules that stop it, shared by the gradient loop and the task vector.

The band. "Looks unseen" is the band of MA values of the holdout (sequences of the same kind the model never
trained on), calibrated with `--band` (`measure.band`). It is measured under the *current* model, not the
input model: unlearning moves unseen data too. `Target.calibrate` re-measures it; the loop does so every
`recalibrate_every` steps, the task-vector search at every lambda it tries.

Blocking. A forget sequence blocks the target while its MA is above the band (`extractable`) or its prefix
of `prefix_tokens` tokens still makes the model continue it verbatim. `blocking` lists them; a method whose
selection is `band` gives gradient (or task vector) only to those, `all` to every forget sequence.

The stop rules (`--stop`):
  band   no forget sequence blocks the target. Declared only on a freshly calibrated band: when the last
         calibration is older than this step, the band is measured again before the run stops.
  mean   the forget set's mean MA is under the holdout's mean MA (the aggregate rule of most benchmarks,
         which leaves single sequences extractable). Uses the mean of the last calibration.
  steps  no rule: the loop runs `--max-steps`; the task vector runs no search and subtracts
         lambda = `--max-lambda`.
Under every rule the loop stops at `--max-steps`, and the utility guard (`--max-utility-drop`) stops the
loop (restoring the best step) or caps lambda.

Gradient loop, at each step:  check = target.check(scores, recalibrate=...); stop if check.reason, or at
`target.out_of_steps(step)`; otherwise train `selected(selection, check.above, n)`.
Task vector: `target.searches` says whether lambda is searched; `target.reached(scores)` is the search's test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..measure.band import EXTRACTABLE, Band, calibrate
from ..measure.scoring import lean_scores
from .context import Context, TokenSets

if TYPE_CHECKING:
    from .config import LoopSettings

# Stop rules (`--stop`) and selections (which forget sequences a method trains on).
BAND, MEAN, STEPS = "band", "mean", "steps"
ALL = "all"

TARGET_REACHED = "target reached: no forget sequence above the band or verbatim"
MEAN_REACHED = "forget mean MA fell under the holdout mean (aggregate rule)"
NOTHING_LEFT = "no forget sequence above the band: nothing left to unlearn"


def calibrate_band(ctx: Context, sets: TokenSets, settings: LoopSettings) -> tuple[Band, float]:
    """(the band, the holdout's mean MA), measured on the holdout under the current model."""
    scores = lean_scores(ctx.model, sets.holdout, ctx.runtime, settings.audit.batch_size, ctx.pad_id)
    ma = [s.ma for s in scores]
    return calibrate(settings.audit.band, ma), float(np.mean(ma))


def blocking(scores, band: Band, prefix_tokens: int) -> list[int]:
    """Forget sequences that keep the target from being reached: above the band, or verbatim."""
    return [i for i, s in enumerate(scores) if band.status(s.ma) == EXTRACTABLE or s.verbatim(prefix_tokens)]


def selected(selection: str, above: list[int], count: int) -> list[int]:
    """The forget sequences a method trains on: those blocking the target (`band`) or all `count` (`all`)."""
    return list(above) if selection == BAND else list(range(count))


@dataclass
class Check:
    """One measurement of the forget set against the target."""

    above: list[int]  # the forget sequences blocking the target
    reason: str | None  # the stop rule that is met (band or mean), None while none is


class Target:
    """The band under the current model and the stop rule of `settings`.

    `band` and `holdout_mean` are those of the last calibration (None before the first); a resumed loop
    passes back the ones it checkpointed.
    """

    def __init__(self, ctx: Context, sets: TokenSets, settings: LoopSettings, band: Band | None = None,
                 holdout_mean: float | None = None) -> None:
        self.ctx, self.sets, self.settings = ctx, sets, settings
        self.rule = settings.stop
        self.band, self.holdout_mean = band, holdout_mean
        # The audit's scores stand in for the first measurement while the weights are those it measured.
        self._unused = {} if ctx.changed or band is not None else dict(ctx.before)

    def calibrate(self) -> Band:
        holdout = self._unused.pop("holdout", None)
        if holdout is not None:
            ma = [s.ma for s in holdout]
            self.band, self.holdout_mean = calibrate(self.settings.audit.band, ma), float(np.mean(ma))
        else:
            self.band, self.holdout_mean = calibrate_band(self.ctx, self.sets, self.settings)
        return self.band

    def score(self) -> list:
        """MA and verbatim of every forget sequence under the current model (one batched pass, no gradient)."""
        forget = self._unused.pop("forget", None)
        if forget is not None:
            return forget
        ctx = self.ctx
        return lean_scores(ctx.model, self.sets.forget, ctx.runtime, self.settings.audit.batch_size, ctx.pad_id)

    def blocking(self, scores) -> list[int]:
        return blocking(scores, self.band, self.settings.audit.prefix_tokens)

    def check(self, scores, *, recalibrate: bool) -> Check:
        """Which sequences block the target, and whether the stop rule is met. Calibrates the band first when
        `recalibrate` (or when there is none yet), and again before declaring the band rule met on an older one."""
        fresh = recalibrate or self.band is None
        if fresh:
            self.calibrate()
        above = self.blocking(scores)
        if self.rule == BAND and not above and not fresh:
            self.calibrate()  # declare the target only on a fresh band
            above = self.blocking(scores)
        if self.rule == BAND and not above:
            return Check(above, TARGET_REACHED)
        if self.rule == MEAN and float(np.mean([s.ma for s in scores])) < self.holdout_mean:
            return Check(above, MEAN_REACHED)
        return Check(above, None)

    def reached(self, scores) -> bool:
        """Whether the stop rule is met on a freshly calibrated band (the task vector's search)."""
        return self.check(scores, recalibrate=True).reason is not None

    @property
    def searches(self) -> bool:
        """Whether the task vector searches lambda (band, mean) or subtracts --max-lambda (steps)."""
        return self.rule != STEPS

    def out_of_steps(self, step: int) -> str | None:
        """The cap every rule shares: --max-steps gradient steps."""
        return f"max steps ({self.settings.max_steps}) reached" if step >= self.settings.max_steps else None
