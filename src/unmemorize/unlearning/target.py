"""The target of unlearning and the rules that stop it, shared by the gradient loop and the task vector.

The band. "Looks unseen" is the band of MA values of the holdout (sequences of the same kind the model never
trained on), calibrated with `--band` (`measure.band`). It is measured under the *current* model, not the
input model: unlearning moves unseen data too. `Target.calibrate` re-measures it; the loop does so every
`recalibrate_every` steps, the task-vector search at every lambda it tries.

The loss band. The same rule on the holdout's per-sequence loss (mean token NLL), from the same scoring pass
of the holdout at every calibration (`measure.band.calibrate_loss`): loss under it is `memorized` (too likely),
above it `over_unlearned` (unusually unlikely: stands out as unlearned).

The target (`--target`):
  ma                 no forget sequence extractable or verbatim (the paper's).
  indistinguishable  ma, and every forget sequence's loss inside the loss band.

The margin (`--margin`, default the method's: 0.25 for `hinge`, 0 for the others). The loop aims inside the
bands by that fraction of their width (`Band.inset`): a sequence keeps getting gradient until it is inside the
band moved in, so it ends well inside rather than on the edge it crossed, where an attacker who compares it
with unseen text still sees it at the extreme, and a small change pushes it back out. The target itself (and
run.json's `target_reached`) is judged on the bands, after unlearning.

Blocking. A forget sequence blocks the target while its MA is above the band (`extractable`) or its prefix
of `prefix_tokens` tokens still makes the model continue it verbatim, and under `indistinguishable` also while
its loss is under the loss band (`memorized` on loss). `blocking` lists them (`Check.above`): they are what is
left to push down, and a method whose selection is `band` gives gradient (or task vector) only to those, `all`
to every forget sequence. Under `indistinguishable` a sequence whose loss is above the loss band (`Check.over`,
over-unlearned on loss) blocks the target too, but never gets forgetting gradient: pushing it down further
cannot bring it back into the band.

The stop rules (`--stop`):
  band   no forget sequence blocks the target. Declared only on a freshly calibrated band: when the last
         calibration is older than this step, the band is measured again before the run stops. Under
         `indistinguishable`, when nothing is left to push down but some sequence is over-unlearned on loss, the
         rule stops too (OVER_LEFT: more forgetting cannot help), and the target is not reached.
  mean   the forget set's mean MA is under the holdout's mean MA (the aggregate rule of most benchmarks,
         which leaves single sequences extractable). Uses the mean of the last calibration.
  steps  no rule: the loop runs `--max-steps`; the task vector runs no search and subtracts
         lambda = `--max-lambda`.
Under every rule the loop stops at `--max-steps`, and the utility guard (`--max-utility-drop`) stops the
loop (restoring the best step) or caps lambda.

Hardening (`--harden FORMAT`, gradient loop only): quantization as an attack in the loop. At every calibration
the weights are also round-tripped through the GGUF format (`io.quantize`), the holdout and the forget set scored
there, and the bands of that quantized model computed; a forget sequence above its aimed band or verbatim there
is `hardened`: it joins the sequences that get gradient, and the loop adds the method's forget loss taken at the
quantized weights Q(w) (with the quantized model's aims), its gradient applied to w (straight through:
d l(Q(w)) / dw := d l / dQ(w)), until the next calibration finds it no longer comes back. Q(w) is that of the last
calibration (rounding again every step would cost a round trip, 3 s on the demo's 135M weights, per step). The band
rule waits for `hardened` to empty too. This is the attack `quantize_4bit` (Q4_0) run before the attacker does: an
unlearning that stops a sequence just under the band leaves it where rounding the weights brings it back.

Two-way selection (`two_way`, method `hinge`): the blocking sequences, to push into the band, and those
over-unlearned on loss, to pull back into it (the method reads which is which from the bands in `ctx.step`).
A Target made with `pulls_back=True` does not stop on OVER_LEFT under `indistinguishable`: the method can
still bring those sequences back, so the band rule waits for them (or --max-steps).

Gradient loop, at each step:  check = target.check(scores, recalibrate=...); stop if check.reason, or at
`target.out_of_steps(step)`; otherwise train `selected(selection, check.above, n, check.over)`.
Task vector: `target.searches` says whether lambda is searched; `target.reached(scores)` is the search's test
(the stop rule is met: under `band`, nothing is left to push down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..io.quantize import round_trip_weights, weights_swapped
from ..measure.band import (
    EXTRACTABLE,
    INDISTINGUISHABLE,
    MEMORIZED,
    OVER_UNLEARNED,
    Band,
    LossBand,
    calibrate,
    calibrate_loss,
)
from ..measure.scoring import lean_scores
from .context import Context, TokenSets

if TYPE_CHECKING:
    from .config import LoopSettings

# Stop rules (`--stop`) and selections (which forget sequences a method trains on).
BAND, MEAN, STEPS = "band", "mean", "steps"
ALL = "all"
TWO_WAY = "two_way"  # `band`'s blocking sequences and those over-unlearned on loss (to pull back)

TARGET_REACHED = "target reached: no forget sequence above the band or verbatim"
MEAN_REACHED = "forget mean MA fell under the holdout mean (aggregate rule)"
NOTHING_LEFT = "no forget sequence above the band: nothing left to unlearn"
OVER_LEFT = "nothing left to push down, but {count} forget sequence(s) over-unlearned on loss (above the loss band)"


def calibrate_band(ctx: Context, sets: TokenSets, settings: LoopSettings) -> tuple[Band, float, LossBand]:
    """(the band, the holdout's mean MA, the loss band), measured on the holdout under the current model (one
    scoring pass for both bands)."""
    scores = lean_scores(ctx.model, sets.holdout, ctx.runtime, settings.audit.batch_size, ctx.pad_id)
    return bands_of(scores, settings.audit.band)


def bands_of(holdout_scores, rule: str) -> tuple[Band, float, LossBand]:
    """(the band, the mean MA, the loss band) of scored holdout sequences."""
    ma = [s.ma for s in holdout_scores]
    return calibrate(rule, ma), float(np.mean(ma)), calibrate_loss(rule, [s.loss for s in holdout_scores])


def blocking(scores, band: Band, prefix_tokens: int, loss_band: LossBand | None = None) -> list[int]:
    """Forget sequences left to push down: above the band, or verbatim; with `loss_band` (the
    `indistinguishable` target), also those whose loss is under it (memorized on loss)."""
    return [i for i, s in enumerate(scores) if band.status(s.ma) == EXTRACTABLE or s.verbatim(prefix_tokens)
            or (loss_band is not None and loss_band.status(s.loss) == MEMORIZED)]


def over_unlearned(scores, loss_band: LossBand) -> list[int]:
    """Forget sequences whose loss is above the loss band (over-unlearned on loss)."""
    return [i for i, s in enumerate(scores) if loss_band.status(s.loss) == OVER_UNLEARNED]


def selected(selection: str, above: list[int], count: int, over: list[int] = ()) -> list[int]:
    """The forget sequences a method trains on: those blocking the target (`band`), all `count` (`all`), or
    those blocking the target plus those over-unlearned on loss (`two_way`), in index order."""
    if selection == TWO_WAY:
        return sorted({*above, *over})
    return list(above) if selection == BAND else list(range(count))


@dataclass
class Check:
    """One measurement of the forget set against the target."""

    above: list[int]  # the forget sequences left to push down (blocking the target): what `band` selects
    reason: str | None  # the stop rule that is met (band or mean), None while none is
    over: list[int] = field(default_factory=list)  # over-unlearned on loss: never selected for forgetting
    over_blocks: bool = False  # whether `over` blocks the target too (the `indistinguishable` target)

    @property
    def blocking(self) -> list[int]:
        """Every forget sequence that keeps the target from being reached."""
        return sorted({*self.above, *self.over}) if self.over_blocks else list(self.above)


class Target:
    """The bands under the current model, the target and the stop rule of `settings`.

    `band`, `holdout_mean` and `loss_band` are those of the last calibration (None before the first); a resumed
    loop passes back the ones it checkpointed.
    """

    def __init__(self, ctx: Context, sets: TokenSets, settings: LoopSettings, band: Band | None = None,
                 holdout_mean: float | None = None, loss_band: LossBand | None = None, *,
                 pulls_back: bool = False, harden: str = "none") -> None:
        self.ctx, self.sets, self.settings = ctx, sets, settings
        # A selection that pulls over-unlearned sequences back (`two_way`): the band rule does not stop while
        # some are left and the target counts them (OVER_LEFT is for methods that cannot bring them back).
        self.pulls_back = pulls_back
        self.rule = settings.stop
        self.target = settings.target
        self.band, self.holdout_mean, self.loss_band = band, holdout_mean, loss_band
        # The audit's scores stand in for the first measurement while the weights are those it measured.
        self._unused = {} if ctx.changed or band is not None else dict(ctx.before)
        # --harden: the quantized weights of the last calibration, their aimed bands, the sequences that come back
        self.harden = harden
        self.quantized: list = []
        self.hard_aims: tuple[Band, LossBand] | None = None
        self.hardened: list[int] = []

    def calibrate(self) -> Band:
        """Both bands (MA and loss) on the holdout under the current model, from one scoring pass."""
        holdout = self._unused.pop("holdout", None)
        if holdout is not None:
            self.band, self.holdout_mean, self.loss_band = bands_of(holdout, self.settings.audit.band)
        else:
            self.band, self.holdout_mean, self.loss_band = calibrate_band(self.ctx, self.sets, self.settings)
        if self.harden != "none":
            self.check_quantized()
        return self.band

    def check_quantized(self) -> None:
        """--harden: round-trip the current weights through the format, calibrate the bands of that model on the
        holdout and list the forget sequences above its aimed band or verbatim there (`hardened`)."""
        ctx, settings = self.ctx, self.settings
        self.quantized = round_trip_weights(ctx.model, self.harden)
        with weights_swapped(self.quantized):
            holdout, forget = (lean_scores(ctx.model, tokens, ctx.runtime, settings.audit.batch_size, ctx.pad_id)
                               for tokens in (self.sets.holdout, self.sets.forget))
        band, _, loss_band = bands_of(holdout, settings.audit.band)
        margin = settings.aim_margin
        self.hard_aims = (band.inset(margin), loss_band.inset(margin))
        self.hardened = blocking(forget, self.hard_aims[0], settings.audit.prefix_tokens)

    def score(self) -> list:
        """MA and verbatim of every forget sequence under the current model (one batched pass, no gradient)."""
        forget = self._unused.pop("forget", None)
        if forget is not None:
            return forget
        ctx = self.ctx
        return lean_scores(ctx.model, self.sets.forget, ctx.runtime, self.settings.audit.batch_size, ctx.pad_id)

    @property
    def on_loss(self) -> bool:
        """Whether the target asks for the loss band too (`indistinguishable`)."""
        return self.target == INDISTINGUISHABLE

    @property
    def aims(self) -> tuple[Band, LossBand]:
        """The bands of the last calibration moved in by the margin (`--margin`): what the loop drives toward."""
        margin = self.settings.aim_margin
        return self.band.inset(margin), self.loss_band.inset(margin)

    def blocking(self, scores) -> list[int]:
        """The forget sequences left to push down (see the module docstring), against the aimed bands."""
        band, loss_band = self.aims
        return blocking(scores, band, self.settings.audit.prefix_tokens, loss_band if self.on_loss else None)

    def measure(self, scores) -> Check:
        """Against the last calibration (moved in by the margin): what is left to push down and what is
        over-unlearned on loss."""
        return Check(self.blocking(scores), None, over_unlearned(scores, self.aims[1]), self.on_loss)

    def check(self, scores, *, recalibrate: bool) -> Check:
        """Which sequences block the target, and whether the stop rule is met. Calibrates the bands first when
        `recalibrate` (or when there is none yet), and again before declaring the band rule met on older ones."""
        fresh = recalibrate or self.band is None or self.loss_band is None
        if fresh:
            self.calibrate()
        check = self.measure(scores)
        if self.rule == BAND and self._done(check) and not fresh:
            self.calibrate()  # declare the target only on fresh bands
            check = self.measure(scores)
        if self.rule == BAND and self._done(check):
            over = check.over if check.over_blocks else []
            check.reason = OVER_LEFT.format(count=len(over)) if over else TARGET_REACHED
        elif self.rule == MEAN and float(np.mean([s.ma for s in scores])) < self.holdout_mean:
            check.reason = MEAN_REACHED
        return check

    def _done(self, check: Check) -> bool:
        """Whether the band rule stops: nothing left to push down, under a selection that pulls back no
        over-unlearned sequence that blocks the target either, and under --harden none that comes back quantized."""
        return (not check.above and not (self.pulls_back and check.over_blocks and check.over)
                and not self.hardened)

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
