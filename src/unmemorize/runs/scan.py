"""`scan`: the most memorized windows of a corpus of any size.

One shard (`shard_docs` corpus records) at a time:

    corpus ─► documents ─► token ids ─► windows ─►  scores  ─► top K + tallies ─► checkpoint
    (stream)   (parse)     (tokenize)    (cut)    (one forward      (a heap of K)     (per shard)
    └──── a background thread, one shard ahead ────┘  per batch)

Memory holds at most three shards (the one scored, one waiting, one being tokenized) and the top K, whatever
the size of the corpus. After every shard the top K and the tallies are checkpointed, so `--resume` skips the
shards already done and ends with the top K of an uninterrupted scan. Under torchrun / accelerate launch,
process r of n takes shards r, r + n, r + 2n, ...; rank 0 gathers the heaps and tallies, merges them and
writes the results.

Windows. A document of n tokens (tokenized without special tokens) gives the windows [s, s + W) for
s = 0, S, 2S, ... while s + W <= n, and a last window [n - W, n) when these leave a tail uncovered. Every
window of a long document thus has W tokens (full batches without padding, MAs over the same number of
predictions) and, with S <= W, every token is in one (S > W samples the document). A document shorter than W
is one window of all its tokens if it has at least `min_tokens` (capped at W); shorter ones are counted, not
scored: over a handful of predictions a MA of 1 is as often luck as memory.

A window is scored on its token ids, after the tokenizer's leading special tokens (a BOS, for models that have
one): as `audit` scores the window's text as a forget sequence. Its text is the decoding of those ids.
Re-encoding the text almost always gives the same ids, but not always (a window that starts inside a word or
cuts a multi-byte character): an audit of `top.jsonl` can then differ slightly from the scan's numbers.

Ranking: higher MA, then lower loss, then earlier in the corpus. The order is total, so the result does not
depend on the number of processes or on interruptions. A token sequence that occurs several times (duplicated
documents: the usual cause of memorization) is kept once, at its best-ranked occurrence.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._version import __version__
from ..errors import InputError
from ..io.corpus import Corpus, Malformed
from ..io.files import atomic_write_text
from ..io.models import Runtime, context_length
from ..io.tokens import ids_sha256, pad_id_of
from ..measure.scoring import LeanScores, lean_scores
from ..progress import progress

MA_EDGES = [round(0.05 * i, 2) for i in range(21)]  # 20 bins; the last one holds MA = 1
STATE_GLOB = ".scan-state.*.json"
TOKENIZE_PIECE = 64  # documents per tokenizer call: the lock it holds is released often


class ScanSettings(BaseModel):
    """What a scan measures and how (the CLI options of `unmemorize scan`)."""

    model_config = ConfigDict(extra="forbid")

    top: int = Field(100, ge=1, description="Windows kept: the K most memorized.")
    window: int = Field(64, ge=2, description="Window length W in tokens.")
    stride: int | None = Field(None, ge=1, description="Tokens between window starts (None: W, no overlap).")
    min_tokens: int = Field(16, ge=2, description="Shortest document scanned (capped at W).")
    prefix_tokens: int = Field(32, ge=1, description="Prefix length P for `verbatim` (capped at T // 2).")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    shard_docs: int = Field(1000, ge=1, description="Corpus records per shard: the unit of checkpoints and "
                            "of the split between processes.")
    text_field: str = "text"
    id_field: str | None = None

    @property
    def step(self) -> int:
        return self.stride or self.window

    @property
    def shortest(self) -> int:
        return min(self.min_tokens, self.window)


def scan_settings(**values) -> ScanSettings:
    """ScanSettings from CLI values; a bad value is an InputError naming its option."""
    try:
        return ScanSettings(**values)
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


# ---------------------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    position: int  # the document's record number in the corpus
    source_id: str
    start: int  # token offsets in the document
    end: int
    tokens: list[int]


@dataclass
class Shard:
    index: int
    windows: list[Window]
    documents: int
    skipped: int  # malformed records
    short: int  # documents under the shortest window


def window_starts(n_tokens: int, window: int, step: int, shortest: int) -> list[int]:
    if n_tokens < shortest:
        return []
    if n_tokens <= window:
        return [0]
    starts = list(range(0, n_tokens - window + 1, step))
    if starts[-1] + window < n_tokens:
        starts.append(n_tokens - window)  # the tail: a full window that ends with the document
    return starts


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS, for many models; often none)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


def prepared_shards(corpus: Corpus, tokenizer, lock: threading.Lock, settings: ScanSettings, rank: int = 0,
                    world: int = 1, first: int = 0) -> Iterator[Shard]:
    """The windows of each shard of this process, from shard `first` on."""
    size = settings.shard_docs
    for index, records in corpus.shards(size, rank, world, first):
        documents, skipped = [], 0
        for offset, record in enumerate(records):
            try:
                documents.append(corpus.document(index * size + offset, record))
            except Malformed:
                skipped += 1
        token_lists = _tokenize(tokenizer, [d.text for d in documents], lock)
        windows, short = [], 0
        for doc, ids in zip(documents, token_lists, strict=True):
            starts = window_starts(len(ids), settings.window, settings.step, settings.shortest)
            short += not starts
            for start in starts:
                end = min(start + settings.window, len(ids))
                windows.append(Window(doc.position, doc.id, start, end, ids[start:end]))
        yield Shard(index, windows, len(documents), skipped, short)


def _tokenize(tokenizer, texts: list[str], lock: threading.Lock) -> list[list[int]]:
    # The scoring thread decodes with the same tokenizer, and a Rust tokenizer must not be used by two threads
    # at once. verbose=False: a long document is cut into windows, so "longer than the maximum" does not apply.
    token_lists: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_PIECE):
        with lock:
            encoded = tokenizer(texts[start : start + TOKENIZE_PIECE], add_special_tokens=False, verbose=False)
        token_lists.extend(encoded["input_ids"])
    return token_lists


T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Iterate `items` in a background thread, up to `depth` items ahead: the next shard is read and tokenized
    (Rust code that releases the GIL) while the model scores this one. Errors are raised here, in order."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as error:  # handed to the consumer, raised in the main thread
            put(("error", error))

    threading.Thread(target=produce, name="scan-prefetch", daemon=True).start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------------------
# The top K


@dataclass(frozen=True)
class Hit:
    """A window in the top K: the row of top.jsonl, plus what ranking and deduplication need."""

    id: str
    text: str
    source_id: str
    start_token: int
    end_token: int
    ma: float
    verbatim: bool
    loss: float
    zlib: float
    position: int
    digest: str  # SHA-256 of the window's token ids

    @property
    def key(self) -> tuple:
        return rank_key(self.ma, self.loss, self.position, self.start_token)

    def row(self) -> dict:
        return {name: getattr(self, name) for name in ("id", "text", "source_id", "start_token", "end_token", "ma",
                                                       "verbatim", "loss", "zlib")}


def rank_key(ma: float, loss: float, position: int, start: int) -> tuple:
    """Larger is more memorized: higher MA, then lower loss, then earlier in the corpus (a total order)."""
    return ma, -loss, -position, -start


class TopK:
    """The K best-ranked distinct windows offered so far, in O(K) memory.

    A min-heap whose root is the weakest window kept: a new window costs one comparison unless it beats the
    root. Windows with the same token ids keep only their best-ranked copy. The result does not depend on
    the order of the offers, so heaps of disjoint shards merge into the heap of the whole corpus.
    """

    def __init__(self, k: int, hits: Iterable[Hit] = ()):
        self.k = k
        self._heap: list[tuple[tuple, Hit]] = []
        self._by_digest: dict[str, Hit] = {}
        for hit in hits:
            self.offer(hit)

    def __len__(self) -> int:
        return len(self._heap)

    def admits(self, key: tuple) -> bool:
        return len(self._heap) < self.k or key > self._heap[0][0]

    def offer(self, hit: Hit) -> None:
        key = hit.key
        if not self.admits(key):
            return
        twin = self._by_digest.get(hit.digest)
        if twin is not None:
            if twin.key >= key:
                return
            self._heap.remove((twin.key, twin))  # rare (a repeated passage that ranks better): O(K)
            heapq.heapify(self._heap)
        self._by_digest[hit.digest] = hit
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (key, hit))
        else:
            _, dropped = heapq.heapreplace(self._heap, (key, hit))
            del self._by_digest[dropped.digest]

    def ranked(self) -> list[Hit]:
        """Most memorized first."""
        return [hit for _, hit in sorted(self._heap, key=lambda item: item[0], reverse=True)]


@dataclass
class Tally:
    documents: int = 0
    skipped_records: int = 0
    short_documents: int = 0
    windows: int = 0
    tokens: int = 0  # tokens through the model (a token in two overlapping windows counts twice)
    verbatim_windows: int = 0
    ma_counts: list[int] = field(default_factory=lambda: [0] * (len(MA_EDGES) - 1))

    def count_windows(self, scores: list[LeanScores], prefix_tokens: int) -> None:
        self.windows += len(scores)
        self.tokens += sum(s.n_tokens for s in scores)
        self.verbatim_windows += sum(s.verbatim(prefix_tokens) for s in scores)
        counts, _ = np.histogram([s.ma for s in scores], bins=MA_EDGES)
        self.ma_counts = [a + int(b) for a, b in zip(self.ma_counts, counts, strict=True)]

    def count_shard(self, shard: Shard) -> None:
        self.documents += shard.documents
        self.skipped_records += shard.skipped
        self.short_documents += shard.short

    def add(self, other: Tally) -> None:
        for name, value in asdict(other).items():
            mine = getattr(self, name)
            setattr(self, name, [a + b for a, b in zip(mine, value, strict=True)] if name == "ma_counts"
                    else mine + value)


@dataclass
class ScanState:
    """Everything a checkpoint holds: enough to go on as if never stopped."""

    next_shard: int  # the next shard this process takes
    seconds: float  # scanning time so far, over every session
    tally: Tally
    top: TopK

    def to_json(self, fingerprint: dict) -> str:
        return json.dumps({"fingerprint": fingerprint, "next_shard": self.next_shard, "seconds": self.seconds,
                           "tally": asdict(self.tally), "hits": [asdict(h) for h in self.top.ranked()]})

    @classmethod
    def from_json(cls, text: str, k: int) -> tuple[ScanState, dict]:
        data = json.loads(text)
        top = TopK(k, (Hit(**h) for h in data["hits"]))
        return cls(data["next_shard"], data["seconds"], Tally(**data["tally"]), top), data["fingerprint"]


# ---------------------------------------------------------------------------------------------------------
# Scoring


def window_batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Batches of windows of similar length (longest first), as `tokens.length_batches` makes them. The sort
    is stable, so a shard gives the same batches, and the same numbers, in any process."""
    ordered = sorted(windows, key=lambda w: -len(w.tokens))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


class Scorer:
    """Scores batches of windows and offers them to the top K."""

    def __init__(self, model, tokenizer, runtime: Runtime, settings: ScanSettings, lock: threading.Lock):
        self.model, self.tokenizer, self.runtime, self.settings, self.lock = model, tokenizer, runtime, settings, lock
        self.lead = leading_special_ids(tokenizer)
        self.pad_id = pad_id_of(tokenizer)

    def score(self, batch: list[Window], state: ScanState) -> None:
        ids = [self.lead + w.tokens for w in batch]
        scores = lean_scores(self.model, ids, self.runtime, len(ids), self.pad_id)
        state.tally.count_windows(scores, self.settings.prefix_tokens)
        for window, score in zip(batch, scores, strict=True):
            if state.top.admits(rank_key(score.ma, score.loss, window.position, window.start)):
                state.top.offer(self.hit(window, score))

    def hit(self, window: Window, score: LeanScores) -> Hit:
        # Only windows that enter the top K are decoded: the text is needed for zlib and for top.jsonl.
        with self.lock:
            text = self.tokenizer.decode(window.tokens)
        return Hit(id=f"{window.source_id}:{window.start}-{window.end}", text=text, source_id=window.source_id,
                   start_token=window.start, end_token=window.end, ma=score.ma,
                   verbatim=score.verbatim(self.settings.prefix_tokens), loss=score.loss,
                   zlib=score.zlib_ratio(text), position=window.position, digest=ids_sha256(window.tokens))


# ---------------------------------------------------------------------------------------------------------
# The scan


@dataclass
class ScanResult:
    summary: dict  # scan.json
    top: list[dict]  # the rows of top.jsonl


def scan(model, tokenizer, corpus: Corpus, settings: ScanSettings, runtime: Runtime, out: Path, *,
         resume: bool = False, model_info: dict | None = None, show_progress: bool = False) -> ScanResult | None:
    """Scan `corpus`; write `out/top.jsonl` and `out/scan.json`. Returns the result on rank 0, None elsewhere.

    With a torch.distributed process group (torchrun / accelerate launch; see `join_processes`), each process
    scans its shards and rank 0 writes. Ctrl-C (KeyboardInterrupt) in a single process writes what it has
    ("complete": false) before it propagates; the checkpoints stay, for `--resume`.
    """
    rank, world = process_rank()
    out = Path(out)
    check_out_folder(out, resume, world)
    check_context(model, settings.window + len(leading_special_ids(tokenizer)))
    barrier(world)  # every process checked the folder before any writes to it
    fingerprint = {"settings": settings.model_dump(), "model": model_info or {}, "corpus": corpus.identity,
                   "processes": world}
    checkpoint = state_path(out, rank, world)
    state = open_state(checkpoint, fingerprint, settings.top, rank, resume)
    barrier(world)

    lock = threading.Lock()
    scorer = Scorer(model, tokenizer, runtime, settings, lock)
    shards = prefetched(prepared_shards(corpus, tokenizer, lock, settings, rank, world, state.next_shard))
    session, earlier, tokens_before = time.perf_counter(), state.seconds, state.tally.tokens
    try:
        with contextlib.closing(shards), progress_bar(show_progress and rank == 0) as show, runtime.autocast():
            # One autocast region for the whole scan: autocast casts the weights once per region, not per batch.
            for shard in shards:
                for batch in window_batches(shard.windows, settings.batch_size):
                    scorer.score(batch, state)
                    elapsed = time.perf_counter() - session
                    show(documents=state.tally.documents + shard.documents, windows=state.tally.windows,
                         rate=(state.tally.tokens - tokens_before) / max(elapsed, 1e-9))
                state.tally.count_shard(shard)
                state.next_shard = shard.index + world
                state.seconds = earlier + time.perf_counter() - session
                save_state(checkpoint, state, fingerprint)
    except KeyboardInterrupt:
        # Several processes cannot gather once interrupted: each keeps its checkpoint, for --resume.
        if world == 1:
            state.seconds = earlier + time.perf_counter() - session
            write_results(out, state, fingerprint, complete=False)
        raise
    merged = gathered(state, rank, world)
    result = None
    if merged is not None:
        result = write_results(out, merged, fingerprint, complete=True)
        for path in out.glob(STATE_GLOB):
            path.unlink()
    barrier(world)  # no process returns before the results are written
    return result


def open_state(checkpoint: Path, fingerprint: dict, k: int, rank: int, resume: bool) -> ScanState:
    """The checkpoint to go on from (--resume), or a fresh one, written at once: from now on the folder holds
    an interrupted scan until the results are complete."""
    if resume:
        state, recorded = ScanState.from_json(checkpoint.read_text(), k)
        if recorded != json.loads(json.dumps(fingerprint)):
            raise InputError(f"--resume: the settings, model or corpus differ from those of the scan in "
                             f"{checkpoint.parent}")
        return state
    state = ScanState(next_shard=rank, seconds=0.0, tally=Tally(), top=TopK(k))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_state(checkpoint, state, fingerprint)
    return state


def check_context(model, tokens: int) -> None:
    """A window longer than the model's context would fail in the first forward pass: fail before it."""
    config = getattr(model, "config", None)
    context = context_length(config) if config is not None else None
    if context is not None and tokens > context:
        raise InputError(f"--window: windows of {tokens} tokens (special tokens included) exceed the model's "
                         f"context of {context}")


def save_state(path: Path, state: ScanState, fingerprint: dict) -> None:
    atomic_write_text(path, state.to_json(fingerprint))


def state_path(out: Path, rank: int, world: int) -> Path:
    return out / f".scan-state.{rank}-of-{world}.json"


def check_out_folder(out: Path, resume: bool, world: int = 1) -> None:
    """A scan writes into a new folder, or resumes the interrupted scan it holds (with as many processes)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    states = sorted(out.glob(STATE_GLOB)) if out.is_dir() else []
    if resume:
        if not states:
            raise InputError(f"--resume: no interrupted scan in {out}")
        ran = {int(m.group(1)) for p in states if (m := re.search(r"-of-(\d+)\.json$", p.name))}
        if ran != {world} or len(states) != world:
            raise InputError(f"--resume: the scan in {out} ran in {', '.join(map(str, sorted(ran)))} process(es); "
                             f"resume it with as many (now {world})")
    elif states:
        raise InputError(f"--out {out}: holds an interrupted scan; pass --resume to continue it, or remove it")
    elif (out / "scan.json").exists():
        raise InputError(f"--out {out}: already holds a scan; choose a new folder")


def write_results(out: Path, state: ScanState, fingerprint: dict, complete: bool) -> ScanResult:
    """top.jsonl (most memorized first: a forget set as it is) and scan.json, each written atomically."""
    rows, seen = [], set()
    for hit in state.top.ranked():
        row = hit.row()
        if row["id"] in seen:  # two documents with the same id: the record number tells them apart
            row["id"] = f"{row['id']}@{hit.position + 1}"
        seen.add(row["id"])
        rows.append(row)
    tally = state.tally
    summary = {
        "documents": tally.documents, "windows": tally.windows, "tokens": tally.tokens, "seconds": state.seconds,
        "tokens_per_s": tally.tokens / state.seconds if state.seconds > 0 else 0.0,
        # SPEC: a list (window counts per MA bin); the bin edges beside it
        "ma_histogram": tally.ma_counts, "ma_histogram_edges": MA_EDGES,
        "complete": complete, "top": len(rows), "verbatim_windows": tally.verbatim_windows,
        "skipped_records": tally.skipped_records, "short_documents": tally.short_documents,
        "settings": fingerprint["settings"], "model": fingerprint["model"], "corpus": fingerprint["corpus"],
        "processes": fingerprint["processes"], "tool_version": __version__,
    }
    atomic_write_text(out / "top.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(out / "scan.json", json.dumps(summary, indent=1) + "\n")
    return ScanResult(summary, rows)


# ---------------------------------------------------------------------------------------------------------
# Processes


def join_processes(runtime: Runtime) -> tuple[int, int]:
    """(rank, number of processes). Under torchrun / accelerate launch this joins the process group (gloo on
    CPU) and puts each process on its own device: call it before loading the model. Alone: (0, 1)."""
    from accelerate import Accelerator

    from .run import end_process_group_at_exit

    accelerator = Accelerator(cpu=runtime.device.type == "cpu")
    if accelerator.num_processes > 1:
        end_process_group_at_exit()
    return accelerator.process_index, accelerator.num_processes


def process_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def gathered(state: ScanState, rank: int, world: int) -> ScanState | None:
    """Rank 0: the state of the whole corpus (every process's top K and tallies merged). Others: None."""
    if world == 1:
        return state
    parts: list | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object((state.top.ranked(), state.tally, state.seconds), parts, dst=0)
    if parts is None:
        return None
    tally = Tally()
    for _, part, _ in parts:
        tally.add(part)
    top = TopK(state.top.k, (hit for hits, _, _ in parts for hit in hits))
    # The processes ran side by side: the scan took as long as the slowest.
    return ScanState(state.next_shard, max(seconds for _, _, seconds in parts), tally, top)


# ---------------------------------------------------------------------------------------------------------
# Display


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[..., None]]:
    """Scan progress on stderr (documents, windows, tokens/s); yields its update function."""
    with progress("scanning", None, enabled=enabled) as update:
        def show(documents: int = 0, windows: int = 0, rate: float = 0.0) -> None:
            update(completed=documents, status=f"{windows:,} windows · {rate:,.0f} tokens/s")

        yield show


def top_table(result: ScanResult, show_text: bool, limit: int = 10):
    """The first rows of top.jsonl: ids, offsets and measures; the text only with --show-text."""
    from rich.table import Table

    rows = result.top[:limit]
    table = Table(title=f"Most memorized windows ({len(rows)} of {len(result.top)} kept)", title_justify="left")
    for column in ("#", "id", "tokens", "MA", "verbatim", "loss", "zlib", "text" if show_text else "sha256"):
        table.add_column(column)
    for number, row in enumerate(rows, start=1):
        shown = row["text"] if show_text else hashlib.sha256(row["text"].encode()).hexdigest()[:8]
        table.add_row(str(number), row["id"], f"{row['start_token']}-{row['end_token']}", f"{row['ma']:.3f}",
                      "yes" if row["verbatim"] else "no", f"{row['loss']:.3f}", f"{row['zlib']:.3f}", shown)
    return table
