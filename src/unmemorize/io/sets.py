"""Sets of text sequences: loading (JSONL, CSV, Parquet, .txt, hf:NAME[:SPLIT]), validation, writing.

Every problem is raised as an InputError naming the file, the line and the reason, before anything
is written anywhere.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .files import atomic_write_text

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Sequence:
    id: str
    text: str

    @property
    def short_hash(self) -> str:
        """What reports show instead of the text: the first 8 hex digits of its SHA-256."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:8]


def checked_file(source: str, suffixes: tuple[str, ...] | None = None) -> tuple[Path, str]:
    """(path, lowercase suffix) of an existing file of a known type, or one clear InputError."""
    suffixes = suffixes or SUFFIXES
    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: file not found")
    if path.is_dir():
        raise InputError(f"{source}: is a folder, expected a file")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise InputError(f"{source}: unknown file type {suffix or '(none)'}; use one of {', '.join(suffixes)}")
    return path, suffix


class SequenceSet(list):
    """A loaded set: a list of Sequence that remembers where it came from (`source`, as the user gave it), so a
    later check can name the file."""

    source: str | None = None


def source_of(sequences: list[Sequence], default: str) -> str:
    """The file (or hf:NAME) a loaded set came from; `default` for a set made in code."""
    return getattr(sequences, "source", None) or default


def load_set(source: str | os.PathLike) -> list[Sequence]:
    """Load one set. `source` is a file path or `hf:NAME[:SPLIT]`."""
    source = str(source)
    if source.startswith("hf:"):
        rows = _hf_rows(source)
    else:
        path, suffix = checked_file(source)
        if suffix == ".parquet":
            rows = _parquet_rows(path)
        else:
            rows = {".csv": _csv_rows, ".txt": _txt_rows}.get(suffix, _jsonl_rows)(source, read_text(path, source))
    loaded = SequenceSet(_validated(source, rows))
    loaded.source = source
    return loaded


def read_text(path: Path, source: str) -> str:
    """A text file as users send it: UTF-8 with or without a byte-order mark (what Windows tools write)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        start = error.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data[:start].count(b"\n") + 1
        raise InputError(f"{source}:{line}: not UTF-8") from None


def lines(text: str) -> list[str]:
    """Lines ending in LF, CRLF or CR, without them. Not str.splitlines: it also splits at characters a JSON
    string may hold as they are (U+2028, U+0085, form feed ...)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# A row is (line number, id or None, text or None): the line number names the place in error messages
# and is the default id.
Row = tuple[int, object, object]


def _jsonl_rows(source: str, text: str) -> list[Row]:
    rows = []
    for line_no, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{source}:{line_no}: bad JSON ({error.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{source}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        if "text" not in obj:
            raise InputError(f"{source}:{line_no}: missing field 'text'")
        rows.append((line_no, obj.get("id"), obj["text"]))
    return rows


def _csv_rows(source: str, text: str) -> list[Row]:
    # newline="": a quoted field keeps its line breaks (and commas); rows end in LF, CRLF or CR alike.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or "text" not in header:
            raise InputError(f"{source}:1: missing column 'text'")
        rows: list[Row] = []
        # Line numbers are the file's (header is line 1), where a row starts, so a user can find it.
        start = reader.line_num + 1
        for values in reader:
            if values:  # [] is a blank line
                row = dict(zip(header, values, strict=False))
                rows.append((start, row.get("id") or None, row.get("text")))
            start = reader.line_num + 1
    except csv.Error as error:
        raise InputError(f"{source}:{reader.line_num}: bad CSV ({error})") from None
    return rows


def _txt_rows(source: str, text: str) -> list[Row]:
    return [(n, None, line) for n, line in enumerate(lines(text), start=1) if line.strip()]


def _parquet_rows(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    if "text" not in table.column_names:
        raise InputError(f"{path}: missing column 'text'")
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
    return [(n, i, t) for n, (i, t) in enumerate(zip(ids, texts, strict=True), start=1)]


def _hf_rows(source: str) -> list[Row]:
    name, _, split = source[3:].partition(":")
    if not name:
        raise InputError(f"{source}: expected hf:NAME[:SPLIT]")
    import datasets

    with _hub_access_unless_local(name, source) as hub:
        try:
            dataset = datasets.load_dataset(name, split=split or "train")
        except Exception as error:  # network, missing dataset, bad split: all user-fixable
            if hub is not None and hub.offline and isinstance(error, OSError):  # ConnectionError, not cached
                raise InputError(f"{source}: cannot load dataset: {hub.reason()}") from None
            raise InputError(f"{source}: cannot load dataset ({type(error).__name__}: {error})".splitlines()[0]) \
                from None
    if "text" not in dataset.column_names:
        raise InputError(f"{source}: missing column 'text'")
    ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
    return [(n, i, t) for n, (i, t) in enumerate(zip(ids, dataset["text"], strict=True), start=1)]


def _hub_access_unless_local(name: str, source: str):
    """hub.hub_access for a dataset the hub would provide; nothing for a local folder or file (hf:./data)."""
    from .hub import hub_access

    return contextlib.nullcontext() if Path(name).exists() else hub_access(source)


def _validated(source: str, rows: Iterable[Row]) -> list[Sequence]:
    sequences: list[Sequence] = []
    seen: dict[str, int] = {}
    for line_no, raw_id, text in rows:
        if not isinstance(text, str):
            raise InputError(f"{source}:{line_no}: field 'text' must be a string")
        if not text.strip():
            raise InputError(f"{source}:{line_no}: empty text")
        seq_id = str(line_no) if raw_id is None or raw_id == "" else str(raw_id)
        if seq_id in seen:
            raise InputError(f"{source}:{line_no}: duplicate id {seq_id!r} (first on line {seen[seq_id]})")
        seen[seq_id] = line_no
        sequences.append(Sequence(seq_id, text))
    if not sequences:
        raise InputError(f"{source}: empty set (no sequences)")
    return sequences


def write_jsonl(path: Path, sequences: Iterable[Sequence]) -> None:
    """Write a set atomically (temporary name, then rename)."""
    lines = "".join(json.dumps({"id": s.id, "text": s.text}) + "\n" for s in sequences)
    atomic_write_text(path, lines)
