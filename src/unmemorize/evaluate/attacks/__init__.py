"""Robustness attacks on an (unlearned) model: does a forgotten sequence come back?

Each attack measures every forget sequence under some change an attacker can make, and compares with the
baseline audit of the same model without any attack:

    sampling       top-k / temperature sampling from the prefix instead of greedy decoding
    prefix         the prompt varied: shorter, longer, lowercased, whitespace changed, primed with a record
    relearn        a few fine-tuning steps on half of the forget set (or on the retain set)
    quantize_8bit  every weight matrix round-tripped through 8-bit absmax integers
    quantize_4bit  the same with 4-bit groups

A sequence is "returned" when it is extractable (resp. verbatim) under the attack and was not in the
baseline. Results name sequences by id and short hash only, never by text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ...errors import InputError
from ...io.models import Runtime
from ...io.sets import Sequence
from ...measure.audit import AuditResult, AuditSettings, audit
from .common import AttackContext
from .prefix import VARIATIONS, prefix_attack
from .quantize import quantize_attack
from .relearn import relearn_attack
from .sampling import sampling_attack

ATTACKS: dict[str, Callable[[AttackContext], dict]] = {
    "sampling": sampling_attack,
    "prefix": prefix_attack,
    "relearn": relearn_attack,
    "quantize_8bit": partial(quantize_attack, bits=8),
    "quantize_4bit": partial(quantize_attack, bits=4),
}


class AttackSettings(BaseModel):
    """Which attacks to run and how hard each one pushes."""

    model_config = ConfigDict(extra="forbid")

    attacks: list[str] = Field(list(ATTACKS), description=f"Attacks to run, in order: {', '.join(ATTACKS)}.")
    samples: int = Field(8, ge=1, description="sampling: continuations drawn per forget prefix.")
    top_k: int = Field(40, ge=0, description="sampling: draw only among the k most likely tokens (0: all).")
    temperature: float = Field(1.0, gt=0, description="sampling: logits are divided by this before softmax.")
    holdout_control: int = Field(20, ge=0, description="sampling: holdout sequences sampled the same way, as a "
                                 "control (a seeded subset of at most this many).")
    prefix_variations: list[str] = Field(list(VARIATIONS), description="prefix: prompt variations to try: "
                                         f"{', '.join(VARIATIONS)}.")
    relearn_steps: int = Field(10, ge=1, description="relearn: gradient steps (AdamW, constant rate).")
    relearn_lr: float = Field(2e-5, gt=0, description="relearn: learning rate; the unlearning methods' own rate, "
                              "so the attacker gets the defender's step size.")
    relearn_on: Literal["forget", "retain"] = Field("forget", description="relearn: train on a seeded half of "
                                                    "the forget set and audit the other half, or train on the "
                                                    "retain set and audit the whole forget set.")
    relearn_batch: int = Field(8, ge=1, description="relearn: sequences per step. When the relearn set is no "
                               "larger, every step sees all of it and the step count is exact; otherwise whole "
                               "epochs run, so the steps are rounded up to a multiple of the steps per epoch.")
    group_size: int = Field(64, ge=1, description="quantize_4bit: weights per scale along the input dimension "
                            "(8-bit uses one scale per output row).")
    quantize_embeddings: bool = Field(True, description="quantize: round-trip the token embeddings too (as GGUF "
                                      "files do), not only the linear layers.")
    seed: int = Field(0, description="Seed of the sampling, the relearn split and the holdout control subset.")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, names: list[str]) -> list[str]:
        return known(names, ATTACKS, "--attacks {!r}: unknown attack")

    @field_validator("prefix_variations")
    @classmethod
    def _variations(cls, names: list[str]) -> list[str]:
        return known(names, VARIATIONS, "prefix variation {!r}: unknown")


def known(names: list[str], allowed, message: str) -> list[str]:
    """`names` without repeats, or one InputError naming the first unknown one."""
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise InputError(f"{message.format(unknown[0])}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))

def run_attacks(model: nn.Module, tokenizer, sets: dict[str, list[Sequence]], audit_settings: AuditSettings,
                runtime: Runtime, settings: AttackSettings, baseline: AuditResult | None = None,
                wrap: Callable[[nn.Module], nn.Module] | None = None,
                token_ids: dict[str, list[list[int]]] | None = None) -> dict:
    """Run `settings.attacks` on `model`; return {attack name: JSON-serializable result}.

    `sets` holds "forget" and "holdout" (and "retain" for relearn_on="retain" and the retain priming).
    `baseline` is the audit of `wrap(model)` without any attack (computed, EL off, when None). `wrap` turns
    a model into the one that is measured (a decoding-time guard, say); relearn and quantize change a deep
    copy of `model` and wrap that. The input model is never modified. `token_ids` holds sets already encoded
    with `audit_settings.max_tokens` (in the order of `sets`): they are not encoded again.
    """
    for name in ("forget", "holdout"):
        if not sets.get(name):
            raise InputError(f"attacks need a non-empty {name} set")
    wrap = wrap or (lambda m: m)
    if baseline is None:
        no_el = audit_settings.model_copy(update={"el_n": []})
        baseline = audit(wrap(model), tokenizer, {"forget": sets["forget"], "holdout": sets["holdout"]}, no_el,
                         runtime)
    ctx = AttackContext(model, tokenizer, sets, audit_settings, runtime, settings, baseline, wrap, token_ids or {})
    results = {}
    for name in settings.attacks:
        started = time.perf_counter()
        results[name] = ATTACKS[name](ctx)
        results[name]["seconds"] = round(time.perf_counter() - started, 3)
    return results
