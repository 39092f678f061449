"""The audit: every per-sequence measure for every set, the bands from the holdout (MA and loss), statuses,
privacy AUCs."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..io.files import atomic_write_text
from ..io.models import Runtime, make_runtime
from ..io.sets import Sequence
from ..io.tokens import check_disjoint, encode, pad_id_of
from .band import (
    DEFAULT_RULE,
    EXTRACTABLE,
    IN_BAND,
    INDISTINGUISHABLE,
    MA_TARGET,
    MEMORIZED,
    OVER_UNLEARNED,
    TARGETS,
    Band,
    LossBand,
    calibrate,
    calibrate_loss,
    check_rule,
)
from .extraction import DECODE_BATCH_FACTOR, extraction_likelihoods
from .privacy import privacy_report
from .scoring import TokenScores, score_tokens


class AuditSettings(BaseModel):
    """What an audit measures and how."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=2, description="Truncate every sequence to this many tokens.")
    prefix_tokens: int = Field(32, ge=1, description="Prefix length P for `verbatim` (capped at T // 2).")
    el_n: list[int] = Field([10], description="n values of EL_n; empty turns EL off.")
    el_sets: list[str] | None = Field(["forget", "earlier"], description="Sets that get EL (None: every set). "
                                      "EL is the decoding of every prefix: on unseen text, where every prefix "
                                      "diverges at once, it costs most and flags nothing the band does not.")
    band: str = Field(DEFAULT_RULE, description="quantile:LO,HI | meanstd:K | mean, on the holdout MA (and, the "
                      "same rule, on the holdout loss).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    seed: int = Field(0, description="Seed of the bootstrap intervals.")

    @field_validator("band")
    @classmethod
    def _band(cls, rule: str) -> str:
        return check_rule(rule)

    @field_validator("el_n")
    @classmethod
    def _el_n(cls, ns: list[int]) -> list[int]:
        if any(n < 1 for n in ns):
            raise ValueError("every n must be at least 1")
        return sorted(set(ns))


@dataclass
class SequenceResult:
    set: str
    id: str
    hash: str
    n_tokens: int
    ma: float
    el: dict[str, float | None]
    verbatim: bool
    loss: float
    zlib: float
    mink: float
    minkpp: float
    status: str | None = None
    loss_status: str | None = None  # against the loss band: memorized (loss under it), in_band, over_unlearned
    text: str = field(default="", repr=False)
    # The per-token scores the row was computed from: the unlearning loop starts from them (step-0 scores and
    # band, NPO's reference) instead of scoring the unchanged model again. Never written to a file.
    scores: TokenScores | None = field(default=None, repr=False, compare=False)


@dataclass
class AuditResult:
    model: dict
    settings: dict
    band: Band | None
    sequences: list[SequenceResult]
    privacy: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # evaluations beside the audit: "oracle", "attacks", "decoding"
    loss_band: LossBand | None = None  # the same rule on the holdout loss (None without a holdout)

    def of(self, set_name: str) -> list[SequenceResult]:
        return [s for s in self.sequences if s.set == set_name]

    def set_names(self) -> list[str]:
        return list(dict.fromkeys(s.set for s in self.sequences))

    def summary(self, set_name: str) -> dict:
        rows = self.of(set_name)
        ma = np.array([r.ma for r in rows])
        counts = {status: sum(r.status == status for r in rows) for status in (EXTRACTABLE, IN_BAND, OVER_UNLEARNED)}
        summary = {"n": len(rows), "mean_ma": float(ma.mean()), "max_ma": float(ma.max()),
                   "extractable": counts[EXTRACTABLE], "verbatim": sum(r.verbatim for r in rows),
                   "over_unlearned": counts[OVER_UNLEARNED], "in_band": counts[IN_BAND],
                   "mean_loss": float(np.mean([r.loss for r in rows]))}
        loss_counts = {status: sum(r.loss_status == status for r in rows)
                       for status in (MEMORIZED, IN_BAND, OVER_UNLEARNED)}
        summary.update({"loss_memorized": loss_counts[MEMORIZED], "loss_in_band": loss_counts[IN_BAND],
                        "loss_over_unlearned": loss_counts[OVER_UNLEARNED]})
        summary["mean_el"] = {n: _mean_or_none([r.el.get(n) for r in rows]) for n in self.settings["el_n_keys"]}
        return summary

    @property
    def target_reached(self) -> bool:
        """SPEC's `ma` target: no forget sequence above the band and none verbatim."""
        return self.reached(MA_TARGET)

    def reached(self, target: str = MA_TARGET, set_name: str = "forget") -> bool:
        """Whether `set_name` meets `target`: `ma` (none extractable, none verbatim) or `indistinguishable`
        (`ma`, and every sequence's loss in the loss band)."""
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
        summary = self.summary(set_name)
        reached = summary["extractable"] == 0 and summary["verbatim"] == 0
        if target == INDISTINGUISHABLE:
            reached = reached and summary["loss_in_band"] == summary["n"]
        return reached

    def to_json(self, show_text: bool = False) -> dict:
        sequences = []
        for row in self.sequences:
            item = asdict(replace(row, scores=None))
            item.pop("scores")
            text = item.pop("text")
            if show_text:
                item["text"] = text
            sequences.append(item)
        settings = {k: v for k, v in self.settings.items() if k != "el_n_keys"}
        return {"model": self.model, "settings": settings,
                "band": None if self.band is None else self.band.to_json(),
                "loss_band": None if self.loss_band is None else self.loss_band.to_json(),
                "sets": {name: self.summary(name) for name in self.set_names()},
                "privacy": self.privacy, **self.extra, "sequences": sequences}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        el_keys = self.settings["el_n_keys"]
        writer = csv.writer(buffer)
        writer.writerow(["set", "id", "hash", "n_tokens", "ma", *[f"el_{n}" for n in el_keys], "verbatim",
                         "loss", "zlib", "mink", "minkpp", "status", "loss_status"])
        for r in self.sequences:
            writer.writerow([r.set, r.id, r.hash, r.n_tokens, f"{r.ma:.6f}", *[r.el.get(n) for n in el_keys],
                             r.verbatim, f"{r.loss:.6f}", f"{r.zlib:.6f}", f"{r.mink:.6f}", f"{r.minkpp:.6f}",
                             r.status, r.loss_status])
        return buffer.getvalue()

    def write(self, folder: Path, name: str = "audit", show_text: bool = False) -> None:
        """`<name>.json` and `<name>.csv` (per sequence), each written atomically."""
        folder = Path(folder)
        atomic_write_text(folder / f"{name}.json", json.dumps(self.to_json(show_text), indent=1) + "\n")
        atomic_write_text(folder / f"{name}.csv", self.to_csv())


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def measure_rows(model, tokenizer, sets: dict[str, list[Sequence]], settings: AuditSettings, runtime: Runtime,
                 pad_id: int, shard: tuple[int, int] | None = None,
                 token_ids: dict[str, list[list[int]]] | None = None) -> list[SequenceResult]:
    """Every per-sequence measure (rows without status), set by set in input order. With `shard` (rank, world),
    only the sequences whose index within their set is rank modulo world. `token_ids` holds sets the caller
    already encoded (with `encode` and these settings' max_tokens): they are not encoded again."""
    rank, world = shard or (0, 1)
    # Every set encoded before any scoring: a holdout or retain set sharing sequences with the forget set is
    # refused first.
    token_ids = {name: encode(tokenizer, seqs, settings.max_tokens, name) if (token_ids or {}).get(name) is None
                 else token_ids[name] for name, seqs in sets.items()}
    check_disjoint(token_ids, sets)
    rows: list[SequenceResult] = []
    for set_name, all_sequences in sets.items():
        # Every process encodes the whole set: a sequence too short fails on every rank alike.
        token_lists = token_ids[set_name][rank::world]
        sequences = all_sequences[rank::world]
        scores = score_tokens(model, token_lists, runtime, settings.batch_size, pad_id)
        ns = settings.el_n if settings.el_sets is None or set_name in settings.el_sets else []
        els = extraction_likelihoods(model, scores, ns, runtime, DECODE_BATCH_FACTOR * settings.batch_size,
                                      pad_id)
        for seq, score, el in zip(sequences, scores, els, strict=True):
            rows.append(SequenceResult(
                set=set_name, id=seq.id, hash=seq.short_hash, n_tokens=score.n_tokens, ma=score.ma, el=el,
                verbatim=score.verbatim(settings.prefix_tokens), loss=score.loss, zlib=score.zlib_ratio(seq.text),
                mink=score.mink, minkpp=score.minkpp, text=seq.text, scores=score))
    return rows


def gather_rows(rows: list[SequenceResult], sets: dict[str, list[Sequence]], world: int) -> list[SequenceResult]:
    """Every process's shard of rows (see `measure_rows`), gathered to every process in the one-process order.
    Every process of the group must call it."""
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, rows)
    return merge_shards(parts, sets)


def merge_shards(parts: list[list[SequenceResult]], sets: dict[str, list[Sequence]]) -> list[SequenceResult]:
    """The rows of shards 0..world-1 (see `measure_rows`) in the one-process order."""
    world = len(parts)
    by_part = [{name: [r for r in part if r.set == name] for name in sets} for part in parts]
    return [by_part[i % world][name][i // world] for name, sequences in sets.items() for i in range(len(sequences))]


def audit(model, tokenizer, sets: dict[str, list[Sequence]], settings: AuditSettings | None = None,
          runtime: Runtime | None = None, *, reference: AuditResult | None = None,
          model_info: dict | None = None, shard: tuple[int, int] | None = None,
          token_ids: dict[str, list[list[int]]] | None = None) -> AuditResult:
    """Measure every sequence of every set (keys: forget, holdout, retain, ...) under `model`.

    The band is calibrated on this model's holdout MA, the loss band on its holdout loss (same rule): each row
    gets `status` (MA) and `loss_status` (loss). `reference` is an audit of the original model; with
    it, the privacy report adds the `ref` attack (loss minus the original model's loss). `shard` (rank, world)
    under torch.distributed: every process measures its share of the sequences and every process gets the
    whole result (every process of the group must call it).
    """
    settings = settings or AuditSettings()
    runtime = runtime or make_runtime()
    pad_id = pad_id_of(tokenizer)
    rows = measure_rows(model, tokenizer, sets, settings, runtime, pad_id, shard, token_ids)
    if shard is not None and shard[1] > 1:
        rows = gather_rows(rows, sets, shard[1])
    band = loss_band = None
    if "holdout" in sets:
        holdout = [r for r in rows if r.set == "holdout"]
        band = calibrate(settings.band, [r.ma for r in holdout])
        loss_band = calibrate_loss(settings.band, [r.loss for r in holdout])
        for r in rows:
            r.status = band.status(r.ma)
            r.loss_status = loss_band.status(r.loss)
    stored = settings.model_dump()
    stored["el_n_keys"] = [str(n) for n in settings.el_n]
    result = AuditResult(model=model_info or {}, settings=stored, band=band, sequences=rows, loss_band=loss_band)
    if "forget" in sets and "holdout" in sets:
        result.privacy = privacy_report(_scores(result, "forget", reference), _scores(result, "holdout", reference),
                                        settings.seed)
    return result


def _scores(result: AuditResult, set_name: str, reference: AuditResult | None) -> dict[str, list[float]]:
    rows = result.of(set_name)
    scores = {name: [getattr(r, name) for r in rows] for name in ("loss", "zlib", "mink", "minkpp")}
    if reference is not None:
        original = {r.id: r.loss for r in reference.of(set_name)}
        if all(r.id in original for r in rows):
            scores["ref"] = [r.loss - original[r.id] for r in rows]
    return scores
