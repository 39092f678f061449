"""`unmemorize verify`: re-audit a model on the forget and holdout sets and check each claim of its certificate.

The certificate's format is written (and read) by `unmemorize.report.certificate`; here every claim is checked
against the model and the data, by name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..errors import InputError
from ..io.hashing import ids_sha256
from ..io.models import Runtime, state_sha256
from ..io.sets import Sequence, load_set
from ..io.tokens import encode
from ..measure.audit import AuditResult, AuditSettings, audit
from ..measure.band import EXTRACTABLE, INDISTINGUISHABLE, MEMORIZED, OVER_UNLEARNED
from ..report.certificate import (
    BAND_TOLERANCE,
    LOSS_BAND_TOLERANCE,
    body_sha256,
    check_certificate,
    tokenizer_fingerprint,
)


@dataclass
class VerifyResult:
    claims: list[dict]  # {"name", "ok", "reason"}, in the order they were checked
    audit: AuditResult | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.claims)

    @property
    def failures(self) -> list[dict]:
        return [c for c in self.claims if not c["ok"]]


def verify_certificate(certificate: dict, model, tokenizer, runtime: Runtime,
                       sets: dict[str, list[Sequence]] | None = None) -> VerifyResult:
    """Check every claim of `certificate` against `model` (the unlearned model, loaded) and the data.

    `sets` holds "forget" and "holdout"; a missing one is loaded from the source the certificate recorded.
    Every claim is checked even after one fails, so the result lists everything that does not hold.
    """
    check_certificate(certificate)
    sets = _sets(certificate, sets or {})
    claims: list[dict] = []

    def claim(name: str, ok: bool, reason: str) -> None:
        claims.append({"name": name, "ok": bool(ok), "reason": reason})

    recorded = certificate["integrity"]["sha256"]
    claim("body_hash", body_sha256(certificate) == recorded,
          "the certificate is as written" if body_sha256(certificate) == recorded else
          "the certificate was edited after it was written (its body no longer matches integrity.sha256)")

    fingerprint = tokenizer_fingerprint(tokenizer)
    same_tokenizer = fingerprint["sha256"] == certificate["tokenizer"]["sha256"]
    claim("tokenizer", same_tokenizer, "the model's tokenizer is the certified one" if same_tokenizer else
          f"the model's tokenizer ({fingerprint['class']}, {fingerprint['vocab_size']} tokens) is not the certified "
          "one, so token-id hashes cannot match")

    certified_model = certificate["output_model"]
    actual = state_sha256(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hint = "" if certified_model.get("weights") in (None, dtype) else \
        f" (weights loaded as {dtype}, certified as {certified_model['weights']}: load them as certified)"
    claim("model_hash", actual == certified_model["sha256"],
          f"weights hash {actual[:12]} is the certified output model" if actual == certified_model["sha256"] else
          f"weights hash {actual[:12]} is not the certified {certified_model['sha256'][:12]}{hint}")

    try:
        settings = AuditSettings(**{k: v for k, v in certificate["audit"].items() if k in AuditSettings.model_fields})
    except ValidationError as error:
        raise InputError(f"--certificate: bad audit settings ({error.errors()[0]['msg']})") from None
    settings = settings.model_copy(update={"el_n": []})  # no claim rests on EL; it is the slow part
    for set_name, entries in (("forget", certificate["sequences"]), ("holdout", certificate["holdout"]["sequences"])):
        ids = encode(tokenizer, sets[set_name], settings.max_tokens, set_name)
        ok, reason = _match(set_name, sets[set_name], ids, entries)
        claim(f"{set_name}_sequences", ok, reason)

    stated = certificate["claims"]
    stated_ok = stated["target_reached"] and stated.get("no_extractable_after") and stated.get("no_verbatim_after")
    on_loss = stated.get("target") == INDISTINGUISHABLE
    if on_loss:  # the target also asks every loss inside the loss band
        stated_ok = stated_ok and stated.get("no_loss_memorized_after") and \
            stated.get("loss_over_unlearned_after") == 0
    loss_counts = (f", {stated.get('loss_memorized_after')} memorized and {stated.get('loss_over_unlearned_after')} "
                   "over-unlearned on loss") if on_loss else ""
    claim("certified_target", stated_ok, f"the certificate states the target ({stated.get('target', 'ma')}) was "
          "reached" if stated_ok else f"the certificate itself states the target ({stated.get('target', 'ma')}) was "
          f"not reached ({stated.get('extractable_after')} extractable, {stated.get('verbatim_after')} verbatim"
          f"{loss_counts})")

    result = audit(model, tokenizer, {"forget": sets["forget"], "holdout": sets["holdout"]}, settings, runtime)
    band, forget = result.band, result.of("forget")
    above = [r.id for r in forget if r.status == EXTRACTABLE]
    claim("not_extractable", not above, f"all {len(forget)} forget sequences are at or under the band's upper "
          f"bound {band.upper:.4f}" if not above else f"{len(above)} of {len(forget)} forget sequences are above the "
          f"band (MA > {band.upper:.4f}): {', '.join(above)}")
    verbatim = [r.id for r in forget if r.verbatim]
    claim("not_verbatim", not verbatim, "no forget sequence is reproduced verbatim from its prefix" if not verbatim
          else f"{len(verbatim)} forget sequences are reproduced verbatim from their prefix: {', '.join(verbatim)}")
    over = [r.id for r in forget if r.status == OVER_UNLEARNED]
    allowed = int(stated.get("over_unlearned_after", 0))
    claim("over_unlearned", len(over) <= allowed, f"{len(over)} over-unlearned (certified {allowed})"
          if len(over) <= allowed else f"{len(over)} over-unlearned, more than the certified {allowed}: "
          f"{', '.join(over)}")

    # The loss band (certificates made before it was certified have no such claims: nothing to check).
    loss_band = result.loss_band
    if "loss_memorized_after" in stated:
        memorized = [r.id for r in forget if r.loss_status == MEMORIZED]
        allowed = int(stated["loss_memorized_after"])
        edge = f"the loss band's lower bound {_fmt(loss_band.lower)}"
        claim("loss_memorized", len(memorized) <= allowed,
              (f"no forget sequence is memorized on loss (every loss at or above {edge})" if not memorized else
               f"{len(memorized)} memorized on loss (loss under {edge}; certified {allowed})")
              if len(memorized) <= allowed else f"{len(memorized)} of {len(forget)} forget sequences are memorized "
              f"on loss (loss under {edge}), more than the certified {allowed}: {', '.join(memorized)}")
    if "loss_over_unlearned_after" in stated:
        over_loss = [r.id for r in forget if r.loss_status == OVER_UNLEARNED]
        allowed = int(stated["loss_over_unlearned_after"])
        claim("loss_over_unlearned", len(over_loss) <= allowed,
              f"{len(over_loss)} over-unlearned on loss (certified {allowed})" if len(over_loss) <= allowed else
              f"{len(over_loss)} over-unlearned on loss (loss above the loss band's upper bound "
              f"{_fmt(loss_band.upper)}), more than the certified {allowed}: {', '.join(over_loss)}")

    certified_band = certificate["band"]
    drift = _band_drift(certified_band, band.lower, band.upper)
    claim("band", drift <= BAND_TOLERANCE, f"band [{_fmt(band.lower)}, {band.upper:.4f}] re-measured on the "
          f"holdout; certified [{_fmt(certified_band.get('lower'))}, {certified_band['upper']:.4f}]"
          + ("" if drift <= BAND_TOLERANCE else f": moved by {drift:.4f} > {BAND_TOLERANCE}"))
    certified_loss = certificate.get("loss_band")
    if certified_loss:
        drift = _band_drift(certified_loss, loss_band.lower, loss_band.upper)
        claim("loss_band", drift <= LOSS_BAND_TOLERANCE, f"loss band [{_fmt(loss_band.lower)}, "
              f"{_fmt(loss_band.upper)}] re-measured on the holdout; certified [{_fmt(certified_loss.get('lower'))}, "
              f"{_fmt(certified_loss.get('upper'))}]"
              + ("" if drift <= LOSS_BAND_TOLERANCE else f": moved by {drift:.4f} > {LOSS_BAND_TOLERANCE}"))
    return VerifyResult(claims, result)


def _sets(certificate: dict, given: dict[str, list[Sequence]]) -> dict[str, list[Sequence]]:
    """The given sets, and for a missing one the file the certificate recorded at unlearning time."""
    sets = dict(given)
    for name in ("forget", "holdout"):
        if sets.get(name):
            continue
        source = certificate.get("data", {}).get(name)
        if not source:
            raise InputError(f"verify needs --{name}: the certificate records no {name} file")
        try:
            sets[name] = load_set(source)
        except InputError as error:
            raise InputError(f"the {name} set recorded in the certificate: {error} (pass --{name})") from None
    return sets


def _match(set_name: str, sequences: list[Sequence], ids: list[list[int]], entries: list[dict]) -> tuple[bool, str]:
    """Match by token-id hash (ids may be renumbered; the tokens are what was certified), as multisets."""
    given = Counter(ids_sha256(t) for t in ids)
    certified = Counter(e["sha256"] for e in entries)
    extra = given - certified
    missing = certified - given
    if not extra and not missing:
        return True, f"all {len(sequences)} {set_name} sequences match the certified token-id hashes"
    unknown = [s.id for s, t in zip(sequences, ids, strict=True) if extra[ids_sha256(t)]]
    absent = [e["id"] for e in entries if missing[e["sha256"]]]
    parts = []
    if unknown:
        parts.append(f"not certified: {', '.join(unknown)}")
    if absent:
        parts.append(f"certified but not given: {', '.join(absent)}")
    return False, f"the {set_name} set is not the certified one ({'; '.join(parts)})"


def _band_drift(certified: dict, lower: float | None, upper: float | None) -> float:
    """The largest move of either edge; infinite when an edge exists on one side only."""
    drift = 0.0
    for now, then in ((lower, certified.get("lower")), (upper, certified.get("upper"))):
        if (now is None) != (then is None):
            return float("inf")
        if now is not None:
            drift = max(drift, abs(now - float(then)))
    return drift


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


__all__ = ["VerifyResult", "verify_certificate"]
