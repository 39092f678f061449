"""Task arithmetic for unlearning: fine-tune a copy on the forget sequences, subtract the difference.

    tau = theta_ft - theta,   theta_new = theta - lambda * tau

`ta` (Ilharco et al. 2023) takes the task vector of every forget sequence; `tau` (Barbulescu &
Triantafillou 2024) only of those still above the band. Lambda is line-searched to the smallest value that
meets the stop rule, so the forget set is pushed just into the band, not below it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ..context import Context
from ..train import finetune


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
