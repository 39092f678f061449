"""certificate.json: what an unlearning run claims, in a form anyone holding the data and the model can re-check.

The certificate never holds the text of a sequence: each forget (and holdout) sequence is named by its id and
the SHA-256 of its token ids, as the little-endian int32 bytes of the ids after truncation to the certified
`max_tokens` (`hashlib.sha256(numpy.asarray(ids, dtype="<i4").tobytes())`). Model weights are named by
`unmemorize.io.models.state_sha256` (names, dtypes and bytes of the state dict, independent of file layout).

`integrity.sha256` is the SHA-256 of the canonical JSON (sorted keys, separators "," and ":", ASCII) of every
other key. It shows that the file was not edited after it was written; it is not a signature: whoever edits
the file can recompute it. Sign the file (or file its hash) where authenticity matters.

`unmemorize.runs.verify.verify_certificate` re-audits a model and checks each claim by name.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._version import __version__
from ..errors import InputError
from ..io.files import atomic_write_text
from ..io.hashing import ids_sha256

if TYPE_CHECKING:
    from ..measure.audit import AuditResult

FORMAT, FORMAT_VERSION = "unmemorize-certificate", 1
TOKEN_HASH = "sha256 of the token ids as little-endian int32 bytes, after truncation to audit.max_tokens"
# How far the re-measured band may drift from the certified one (MA units) before the band claim fails: the
# same model on the same holdout gives the same band, up to autocast rounding on other hardware.
BAND_TOLERANCE = 0.05
# The same for the loss band, in nats of mean token NLL.
LOSS_BAND_TOLERANCE = 0.05
REQUIRED = ("format", "format_version", "tool.version", "created", "method", "input_model.sha256",
            "output_model.sha256", "tokenizer.sha256", "audit", "band.upper", "holdout.sequences", "sequences",
            "claims.target_reached", "integrity.sha256")


def tokenizer_fingerprint(tokenizer) -> dict:
    """Token-id hashes only mean something under one tokenizer: its class, size and a hash of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = sorted(tokenizer.special_tokens_map.items())
    digest = hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=True).encode()).hexdigest()
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "sha256": digest}


def body_sha256(certificate: dict) -> str:
    body = {k: v for k, v in certificate.items() if k != "integrity"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_certificate(run: dict, before: AuditResult, after: AuditResult, forget_ids: list[list[int]],
                      forget_names: list[str], tokenizer_info: dict, created: str | None = None, *,
                      holdout_ids: list[list[int]], holdout_names: list[str],
                      sources: dict[str, str] | None = None) -> dict:
    """The certificate of a run: `run` is run.json, `before`/`after` the audits of the input/output model.

    `holdout_ids` are certified too: a verifier who could bring any holdout could widen the band at will.
    `sources` (optional) records where the forget and holdout sets came from (paths, never text), so that
    `verify` can find them again without being told.
    """
    if len(forget_ids) != len(forget_names):
        raise ValueError("one token-id list per forget name")
    rows_before = {r.id: r for r in before.of("forget")}
    rows_after = {r.id: r for r in after.of("forget")}
    sequences = []
    for name, ids in zip(forget_names, forget_ids, strict=True):
        b, a = rows_before[name], rows_after[name]
        sequences.append({"id": name, "sha256": ids_sha256(ids), "n_tokens": len(ids),
                          "status_before": b.status, "status_after": a.status, "verbatim_before": b.verbatim,
                          "verbatim_after": a.verbatim, "ma_before": b.ma, "ma_after": a.ma,
                          "loss_status_before": b.loss_status, "loss_status_after": a.loss_status})
    summary = after.summary("forget")
    settings = {k: v for k, v in after.settings.items() if k != "el_n_keys"}
    certificate = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tool": {"name": "unmemorize", "version": __version__},
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
        "method": run["method"], "settings": run["settings"],
        "run": {k: run.get(k) for k in ("steps", "lambda", "stop_reason", "seconds")},
        "input_model": {"source": run["input_model"]["source"], "sha256": run["input_model"]["sha256"]},
        "output_model": {"sha256": after.model["sha256"],
                         "weights": after.model.get("runtime", {}).get("weights")},
        "hashes": {"model": "unmemorize.io.models.state_sha256 of the loaded weights", "tokens": TOKEN_HASH,
                   "integrity": "sha256 of the canonical JSON of every key but 'integrity'; not a signature"},
        "tokenizer": tokenizer_info,
        "audit": settings,
        "band": after.band.to_json(),
        "band_before": before.band.to_json() if before.band else None,
        "loss_band": after.loss_band.to_json() if after.loss_band else None,
        "loss_band_before": before.loss_band.to_json() if before.loss_band else None,
        "holdout": {"n": len(holdout_ids), "mean_ma_before": before.summary("holdout")["mean_ma"],
                    "mean_ma_after": after.summary("holdout")["mean_ma"],
                    "sequences": [{"id": n, "sha256": ids_sha256(ids)}
                                  for n, ids in zip(holdout_names, holdout_ids, strict=True)]},
        "data": {k: _where(v) for k, v in (sources or {}).items() if k in ("forget", "holdout") and v},
        "sequences": sequences,
        "claims": {"target_reached": bool(run["target_reached"]),
                   "no_extractable_after": summary["extractable"] == 0, "no_verbatim_after": summary["verbatim"] == 0,
                   "extractable_before": before.summary("forget")["extractable"],
                   "extractable_after": summary["extractable"], "verbatim_after": summary["verbatim"],
                   "over_unlearned_after": summary["over_unlearned"], "n": summary["n"],
                   # the loss band: memorized on loss = loss under it; over-unlearned = loss above it
                   "target": run.get("target", "ma"), "no_loss_memorized_after": summary["loss_memorized"] == 0,
                   "loss_memorized_before": before.summary("forget")["loss_memorized"],
                   "loss_memorized_after": summary["loss_memorized"],
                   "loss_over_unlearned_after": summary["loss_over_unlearned"]},
        "attacks": {name: {key: int(result[key]) for key in ("returned_extractable", "returned_verbatim",
                                                             "beyond_oracle_extractable", "beyond_oracle_verbatim")
                           if key in result}
                    for name, result in after.extra.get("attacks", {}).items()} or None,
        "oracle": {k: after.extra["oracle"][k] for k in ("forget_quality", "privleak")}
        if "oracle" in after.extra else None,
    }
    # One JSON round trip turns numpy scalars and tuples into what a reader of the file will see, so the
    # hash computed now is the hash a verifier computes from the file.
    certificate = json.loads(json.dumps(certificate, default=_plain))
    certificate["integrity"] = {"sha256": body_sha256(certificate)}
    return certificate


def _where(source: str) -> str:
    return source if source.startswith("hf:") else str(Path(source).resolve())


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_certificate(folder: Path, certificate: dict) -> Path:
    path = Path(folder) / "certificate.json"
    atomic_write_text(path, json.dumps(certificate, indent=1) + "\n")
    return path


def read_certificate(path: Path) -> dict:
    """Load and check the shape of a certificate file; every problem is one InputError line."""
    path = Path(path)
    try:
        certificate = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"--certificate {path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"--certificate {path}: is a folder, expected certificate.json") from None
    except UnicodeDecodeError:
        raise InputError(f"--certificate {path}: not UTF-8") from None
    except json.JSONDecodeError as error:
        raise InputError(f"--certificate {path}:{error.lineno}: bad JSON ({error.msg})") from None
    check_certificate(certificate, str(path))
    return certificate


def check_certificate(certificate, where: str = "certificate") -> None:
    if not isinstance(certificate, dict):
        raise InputError(f"--certificate {where}: expected a JSON object")
    if certificate.get("format") != FORMAT:
        raise InputError(f"--certificate {where}: not an unmemorize certificate (format is not {FORMAT!r})")
    if certificate.get("format_version") != FORMAT_VERSION:
        raise InputError(f"--certificate {where}: format version {certificate.get('format_version')!r} is not "
                         f"supported (this unmemorize reads {FORMAT_VERSION})")
    for key in REQUIRED:
        node = certificate
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"--certificate {where}: missing key {key!r}")
            node = node[part]
    # The checks below read these as numbers and hashes; a wrong type is a broken file, not a failed claim.
    if not isinstance(certificate["band"]["upper"], int | float) or \
            not isinstance(certificate["band"].get("lower"), int | float | None):
        raise InputError(f"--certificate {where}: band bounds must be numbers")
    loss_band = certificate.get("loss_band")
    if loss_band is not None and (not isinstance(loss_band, dict) or not all(
            isinstance(loss_band.get(edge), int | float | None) for edge in ("lower", "upper"))):
        raise InputError(f"--certificate {where}: loss_band bounds must be numbers or null")
    listed = (("sequences", certificate["sequences"]), ("holdout.sequences", certificate["holdout"]["sequences"]))
    for key, entries in listed:
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                                    and "id" in e for e in entries):
            raise InputError(f"--certificate {where}: {key!r} must be a list of {{id, sha256}} objects")
    if not isinstance(certificate["audit"], dict):
        raise InputError(f"--certificate {where}: 'audit' must be an object of audit settings")


__all__ = ["body_sha256", "build_certificate", "check_certificate", "read_certificate", "tokenizer_fingerprint",
           "write_certificate"]
