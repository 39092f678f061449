"""Task arithmetic for unlearning: fine-tune a copy on the forget sequences, subtract the difference.

    theta_ft = argmin -(1 / N) * sum_{b,t} m[b,t] * log p(x[b,t] | x[b,<t])   (tv_epochs of Adam from theta)
    tau = theta_ft - theta,   theta_new = theta - lambda * tau

The forget loss is the plain fine-tuning NLL (`unlearn.train`) over the chosen forget sequences, minimized
on a copy; the model itself only ever moves along -tau. `ta` (Ilharco et al. 2023) takes the task vector of
every forget sequence; `tau` (Barbulescu & Triantafillou 2024) only of those still above the band (or
verbatim). Lambda is line-searched to the smallest value in (0, --max-lambda] that meets the stop rule, so
the forget set is pushed just into the band, not below it; under `--stop steps` there is no search and
lambda = --max-lambda. Either way the utility guard caps it: when that lambda costs more than
--max-utility-drop, the largest lambda within it. `sgatau` runs `sga` first and `tau` on what is left.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from pydantic import Field

from ...measure.utility import utility, utility_drop
from ..context import Context, LoopOutcome, TokenSets
from ..target import Target, selected
from ..train import finetune
from .ascent import Ascent
from .base import BAND, Method, MethodConfig, MethodSpec


class TaskVectorConfig(MethodConfig):
    tolerance: float = Field(0.02, gt=0, description="How close (in lambda) the line searches get to the "
                             "smallest lambda that meets the stop rule and to the utility guard's limit.")


class TaskVector(Method):
    """Subtract lambda x the task vector of the forget sequences; after a gradient stage, of what it left."""

    Config = TaskVectorConfig

    def unlearn(self, session) -> None:
        session.lam, session.outcome = subtract(session.ctx, session.settings, session.sets, session.outcome,
                                                session.utility_before, session.spec.selection,
                                                self.config.tolerance)


def subtract(ctx: Context, settings, tokens: TokenSets, previous: LoopOutcome | None, utility_before: dict,
             selection: str, tolerance: float) -> tuple[float | None, LoopOutcome]:
    """(lambda, outcome): the task vector of the selected forget sequences, subtracted at the lambda the stop
    rule and the utility guard choose. `previous`: the outcome of an earlier stage (sgatau's sga)."""
    audit_settings = settings.audit
    target = Target(ctx, tokens, settings)
    target.calibrate()
    chosen = selected(selection, target.blocking(target.score()), len(tokens.forget))
    steps = previous.steps if previous else 0
    trained = previous.tokens_trained if previous else 0
    if not chosen:
        return None, LoopOutcome(steps, "target reached before the task vector: nothing to subtract", target.band,
                                 trained)
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in params.items()}
    vector = task_vector(ctx, params, [tokens.forget[i] for i in chosen], epochs=settings.tv_epochs,
                         lr=settings.learning_rate, batch_size=audit_settings.batch_size, seed=settings.seed)
    trained += sum(len(tokens.forget[i]) for i in chosen) * settings.tv_epochs
    ctx.changed = True  # from here on the weights move with every lambda tried

    def reached(lam: float) -> bool:
        apply(params, original, vector, lam)
        return target.reached(target.score())

    def too_costly(lam: float) -> bool:
        apply(params, original, vector, lam)
        now = utility(ctx.model, tokens.retain, tokens.general, ctx.runtime, audit_settings.batch_size, ctx.pad_id)
        return utility_drop(utility_before, now) > settings.max_utility_drop

    if target.searches:
        _, lam = line_search(reached, settings.max_lambda, tolerance)
        wanted = settings.max_lambda if lam is None else lam
        reason = (f"lambda {wanted:.3f}: smallest that meets the stop rule" if lam is not None else
                  f"even lambda {wanted} (--max-lambda) does not meet the stop rule")
    else:
        wanted = settings.max_lambda
        reason = f"lambda {wanted} (--max-lambda): --stop steps, no search"
    final = wanted
    if too_costly(wanted):
        final, _ = line_search(too_costly, wanted, tolerance)  # the largest lambda still within the guard
        reason += (f"; utility guard: it costs more than {settings.max_utility_drop:.0%} utility, "
                   f"kept lambda {final:.3f}, the largest within it")
    reached(final)  # leaves the model (and the band) at the chosen lambda
    if previous:
        reason = f"{previous.stop_reason}; then tau: {reason}"
    return final, LoopOutcome(steps, reason, target.band, trained)


def task_vector(ctx: Context, params: dict[str, torch.nn.Parameter], chosen: list[list[int]], *, epochs: int,
                lr: float, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """theta_ft - theta for the named parameters, from fine-tuning a copy of the model on `chosen`."""
    tuned = copy.deepcopy(getattr(ctx.model, "module", ctx.model))
    finetune(tuned, chosen, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, runtime=ctx.runtime,
             pad_id=ctx.pad_id, description="task vector")
    tuned_params = dict(tuned.named_parameters())
    return {name: (tuned_params[name].detach() - param.detach()) for name, param in params.items()}


def apply(params: dict[str, torch.nn.Parameter], original: dict[str, torch.Tensor], vector: dict[str, torch.Tensor],
          lam: float) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(original[name] - lam * vector[name])


def line_search(holds: Callable[[float], bool], high: float, tol: float = 0.02) -> tuple[float, float | None]:
    """(last lambda where holds() failed, smallest lambda in (0, high] where it holds), to within `tol`.

    The second is None when even `high` fails (the first is then `high`). Assumes holds() is monotone in
    lambda (more subtraction, less memorization and less utility): a doubling scan from high/64 finds the
    first success, then bisection narrows the gap to the last failure.
    """
    low, lam = 0.0, high / 64
    while not holds(lam):
        if lam >= high:
            return high, None
        low, lam = lam, min(2 * lam, high)
    while lam - low > tol:
        middle = (low + lam) / 2
        if holds(middle):
            lam = middle
        else:
            low = middle
    return low, lam


SPECS = [
    MethodSpec("ta", "task arithmetic: subtract lambda x the task vector of fine-tuning on F, lambda line-searched",
               (TaskVector,), lr=1e-4),
    MethodSpec("tau", "task vector from the sequences above the band, smallest lambda reaching the target "
               "(Barbulescu 2024)", (TaskVector,), selection=BAND, lr=1e-4),
    MethodSpec("sgatau", "sga, then tau on whatever is still above the band", (Ascent, TaskVector), selection=BAND),
]
