"""What every attack shares: the context it runs in, per-sequence rows against the baseline, and summaries.

"Returned" is the one number every attack reports: a forget sequence that is extractable (resp. verbatim)
under the attack but was not in the baseline audit of the same model without any attack.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ...errors import InputError
from ...io.models import Runtime
from ...io.sets import Sequence
from ...io.tokens import encode, pad_id_of
from ...measure.audit import AuditResult, AuditSettings, SequenceResult, audit
from ...measure.band import EXTRACTABLE, Familywise


@dataclass
class AttackContext:
    """Everything an attack needs. `model` is the unwrapped model; measure only `wrap(model)`."""

    model: nn.Module
    tokenizer: object
    sets: dict[str, list[Sequence]]
    audit_settings: AuditSettings
    runtime: Runtime
    settings: object  # AttackSettings (not imported here to keep the import graph one-way)
    baseline: AuditResult
    wrap: Callable[[nn.Module], nn.Module]
    token_ids: dict[str, list[list[int]]] = field(default_factory=dict)  # sets already encoded, in `sets` order

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @property
    def no_el(self) -> AuditSettings:
        """The audit settings with EL off: attacks compare MA statuses and verbatim, EL would only cost time."""
        return self.audit_settings.model_copy(update={"el_n": []})

    def encode(self, sequences: list[Sequence], set_name: str) -> list[list[int]]:
        """Token ids of `sequences` (some of the set `set_name`): those of the run when it has them."""
        known = self._ids.get(set_name, {})
        if all(s.id in known for s in sequences):
            return [known[s.id] for s in sequences]
        return encode(self.tokenizer, sequences, self.audit_settings.max_tokens, set_name)

    def baseline_row(self, seq: Sequence) -> SequenceResult:
        return self._baseline_rows[seq.id]

    def __post_init__(self) -> None:
        self._ids = {name: {s.id: ids for s, ids in zip(self.sets[name], self.token_ids[name], strict=True)}
                     for name in self.token_ids if name in self.sets}
        self._baseline_rows = {r.id: r for r in self.baseline.of("forget")}
        missing = [s.id for s in self.sets["forget"] if s.id not in self._baseline_rows]
        if missing:
            raise InputError(f"attacks: the baseline audit has no forget sequence {missing[0]!r}")

    def weights_copy(self) -> nn.Module:
        """A deep copy of the unwrapped model: relearning and quantization change it, never the input model."""
        return copy.deepcopy(self.model)

    def audit(self, model: nn.Module, sets: dict[str, list[Sequence]]) -> AuditResult:
        """Audit `wrap(model)` with EL off; the band is calibrated on this model's own holdout."""
        ids = {name: self.encode(seqs, name) for name, seqs in sets.items() if name in self._ids}
        return audit(self.wrap(model), self.tokenizer, sets, self.no_el, self.runtime, token_ids=ids)


def sequence_row(ctx: AttackContext, seq: Sequence, status: str | None, verbatim: bool, **results) -> dict:
    """One forget sequence under an attack: id and short hash (never the text), results, status vs baseline."""
    base = ctx.baseline_row(seq)
    return {"id": seq.id, "hash": seq.short_hash, **results, "status": status, "verbatim": bool(verbatim),
            "baseline_status": base.status, "baseline_verbatim": bool(base.verbatim),
            "returned_extractable": status == EXTRACTABLE and base.status != EXTRACTABLE,
            "returned_verbatim": bool(verbatim) and not base.verbatim}


def counts(rows: list[dict]) -> dict:
    """The headline numbers of an attack over its per-sequence rows."""
    return {"returned_extractable": sum(r["returned_extractable"] for r in rows),
            "returned_verbatim": sum(r["returned_verbatim"] for r in rows),
            "extractable": sum(r["status"] == EXTRACTABLE for r in rows),
            "verbatim": sum(r["verbatim"] for r in rows), "n": len(rows)}


def audit_rows(ctx: AttackContext, result: AuditResult, sequences: list[Sequence]) -> list[dict]:
    """Rows for `sequences` (forget) from an audit of a modified model, beside their baseline MA."""
    by_id = {r.id: r for r in result.of("forget")}
    return [sequence_row(ctx, s, by_id[s.id].status, by_id[s.id].verbatim, ma=by_id[s.id].ma,
                         baseline_ma=ctx.baseline_row(s).ma) for s in sequences]


def holdout_summary(result: AuditResult) -> dict:
    """The control: how the modified model sees unseen text (band and holdout mean MA)."""
    return {"band": None if result.band is None else result.band.to_json(),
            "holdout_mean_ma": result.summary("holdout")["mean_ma"]}


def familywise_control(familywise: Familywise, holdout_ma: np.ndarray, any_name: str) -> dict:
    """The family-wise band and how often the holdout itself is above some reading's band (`any_name`) and above
    the family-wise band (`holdout_extractable`), in-sample."""
    above_one, above = familywise.rate(holdout_ma)
    return {"familywise": familywise.band.to_json(), any_name: above_one, "holdout_extractable": above}
