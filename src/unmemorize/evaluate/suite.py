"""Everything measured around an audit: utility (with generation health and downstream tasks), the
comparison with an oracle, and the robustness attacks. Used by `unlearn` (before/after), `audit` and `attack`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..io.models import Runtime, load_model, state_sha256
from ..io.sets import Sequence
from ..measure.audit import AuditResult, AuditSettings, audit
from ..measure.extraction import DECODE_BATCH_FACTOR
from ..measure.utility import utility
from .attacks import AttackSettings, against_oracle, run_attacks
from .downstream import downstream
from .health import generation_health
from .oracle import oracle_report


class EvaluationSettings(BaseModel):
    """What is evaluated besides the audit (and the cheap utility the unlearning guard uses)."""

    model_config = ConfigDict(extra="forbid")

    oracle: str | None = Field(None, description="A model trained without the forget set (folder, hub id, .gguf): "
                               "forget quality, privleak and its own statuses.")
    attacks: AttackSettings | None = Field(None, description="Robustness attacks on the unlearned model (None: off).")
    tasks: list[str] = Field([], description="lm-evaluation-harness tasks, e.g. unmemorize_pyfacts, hellaswag.")
    task_limit: int | None = Field(None, ge=1, description="At most this many documents per task.")
    health: bool = Field(True, description="Generation health: repeated n-grams in greedy continuations.")


def model_utility(model, tokenizer, ids: dict[str, list[list[int]] | None], runtime: Runtime,
                  settings: EvaluationSettings, batch_size: int, pad_id: int,
                  audited: AuditResult | None = None) -> dict:
    """Retain MA and loss, general and holdout perplexity, generation health, downstream task scores.

    `ids` holds token lists by set name: "retain" (may be None), "general", "holdout". `audited`: an audit of
    this model over the same sets, whose rows are reused instead of scoring retain and holdout again.
    """
    result = utility(model, ids["retain"], ids["general"], runtime, batch_size, pad_id, holdout_ids=ids["holdout"],
                     audited=audited)
    if settings.health:
        result["generation"] = generation_health(model, ids["general"], runtime,
                                                 batch_size=DECODE_BATCH_FACTOR * batch_size, pad_id=pad_id)
    if settings.tasks:
        result["downstream"] = downstream(model, tokenizer, settings.tasks, limit=settings.task_limit,
                                          batch_size=batch_size, compute_dtype=runtime.compute)
    return result


def audit_oracle(oracle: str, sets: dict[str, list[Sequence]], audit_settings: AuditSettings, runtime: Runtime,
                 load_options: dict | None = None) -> AuditResult:
    """The oracle's own audit of the same sets (EL off: the comparison uses losses, MA and statuses)."""
    model, tokenizer = load_model(oracle, runtime, **(load_options or {}))
    info = {"source": oracle, "sha256": state_sha256(model), "runtime": runtime.describe()}
    return audit(model, tokenizer, sets, audit_settings.model_copy(update={"el_n": []}), runtime, model_info=info)


def evaluate_audit(result: AuditResult, model, tokenizer, sets: dict[str, list[Sequence]],
                   audit_settings: AuditSettings, runtime: Runtime, attacks: AttackSettings | None = None,
                   oracle_audit: AuditResult | None = None,
                   token_ids: dict[str, list[list[int]]] | None = None, load_options: dict | None = None) -> None:
    """Add "oracle" and "attacks" to `result` (an audit of `model`), as after.json holds them; with both, the
    attacks are paired with the same attacks on the oracle (`attacks.against_oracle`). `token_ids`: the sets
    already encoded (the attacks do not encode them again)."""
    if oracle_audit is not None:
        result.extra["oracle"] = oracle_report(result, oracle_audit)
    if attacks is not None:
        result.extra["attacks"] = run_attacks(model, tokenizer, sets, audit_settings, runtime, attacks,
                                              baseline=result, token_ids=token_ids)
        if oracle_audit is not None:
            against_oracle(result.extra["attacks"],
                           oracle_attacks(oracle_audit, sets, audit_settings, runtime, attacks, load_options))


def oracle_attacks(oracle_audit: AuditResult, sets: dict[str, list[Sequence]], audit_settings: AuditSettings,
                   runtime: Runtime, attacks: AttackSettings, load_options: dict | None = None) -> dict:
    """The attacks run on the oracle (loaded again from its audit's source), against its own audit: what they
    find in a model that never saw the request. Kept in `oracle_audit.extra`, so the runs of a comparison that
    share the oracle's audit attack it once."""
    done = oracle_audit.extra.setdefault("attacks", {})
    key = attacks.model_dump_json()
    if key not in done:
        model, tokenizer = load_model(oracle_audit.model["source"], runtime, **(load_options or {}))
        done[key] = run_attacks(model, tokenizer, sets, audit_settings, runtime, attacks, baseline=oracle_audit)
    return done[key]
