"""The one entry point of unlearning: run a method's stages on a model, return what they left.

    unlearned = unlearn_model(model, tokenizer, settings, tokens, runtime, work, utility_before, accelerator)
    unlearned.model, unlearned.outcome (steps, stop reason, ...), unlearned.lam (task vector's lambda or None)

The method comes from the registry (`settings.method`, options `settings.method_args`); each stage unlearns
from where the previous one left the model (sgatau: sga, then tau on what is left).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..io.models import Runtime
from ..io.tokens import pad_id_of
from .config import LoopSettings
from .context import Context, LoopOutcome, TokenSets
from .methods import MethodSpec


@dataclass
class Session:
    """What a method's stage works with, and what it leaves: the model (`ctx.model`), the outcome, lambda."""

    ctx: Context
    spec: MethodSpec
    settings: LoopSettings
    sets: TokenSets
    work: Path
    utility_before: dict
    accelerator: Any
    outcome: LoopOutcome | None = None
    lam: float | None = None


class Unlearned(NamedTuple):
    model: torch.nn.Module
    outcome: LoopOutcome
    lam: float | None


def unlearn_model(model: torch.nn.Module, tokenizer, settings: LoopSettings, tokens: TokenSets, runtime: Runtime,
                  work: Path, utility_before: dict, accelerator, before: dict[str, list] | None = None) -> Unlearned:
    """Unlearn `tokens.forget` from `model` with the method of `settings`. Gradient stages log to
    `work/trajectory.jsonl` and checkpoint into `work`; the utility guard compares with `utility_before`.
    `before` holds the audit's scores of `model` ("forget" in `tokens.forget` order, "holdout"): the first
    measurement of every stage starts from them instead of scoring the unchanged model again."""
    ctx = Context(model=model, runtime=runtime, pad_id=pad_id_of(tokenizer), forget_ids=tokens.forget,
                  before=before or {})
    spec = settings.spec
    session = Session(ctx, spec, settings, tokens, Path(work), utility_before, accelerator)
    for stage in spec.build(settings.method_args, tokenizer):
        stage.unlearn(session)
    if session.outcome is None:
        raise RuntimeError(f"{spec.name}: no stage recorded an outcome")
    return Unlearned(ctx.model, session.outcome, session.lam)
