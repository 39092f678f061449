"""Sets of text sequences: loading (JSONL, CSV, Parquet, .txt, hf:NAME[:SPLIT]), validation, writing.

Every problem is raised as an InputError naming the file, the line and the reason, before anything
is written anywhere.
"""

from __future__ import annotations

import csv
import hashlib
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


def load_set(source: str | os.PathLike) -> list[Sequence]:
    """Load one set. `source` is a file path or `hf:NAME[:SPLIT]`."""
    source = str(source)
    if source.startswith("hf:"):
        return _validated(source, _hf_rows(source))
    path, suffix = checked_file(source)
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            line = path.read_bytes()[: error.start].count(b"\n") + 1
            raise InputError(f"{source}:{line}: not UTF-8") from None
        rows = {".csv": _csv_rows, ".txt": _txt_rows}.get(suffix, _jsonl_rows)(source, text)
    return _validated(source, rows)


# A row is (line number, id or None, text or None): the line number names the place in error messages
# and is the default id.
Row = tuple[int, object, object]


def _jsonl_rows(source: str, text: str) -> list[Row]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
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
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise InputError(f"{source}:1: missing column 'text'")
    # Line numbers are the file's (header is line 1), so a user can find the row.
    return [(line_no, row.get("id") or None, row["text"]) for line_no, row in enumerate(reader, start=2)]


def _txt_rows(source: str, text: str) -> list[Row]:
    return [(n, None, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


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

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # network, missing dataset, bad split: all user-fixable
        raise InputError(f"{source}: cannot load dataset ({type(error).__name__}: {error})".splitlines()[0]) from None
    if "text" not in dataset.column_names:
        raise InputError(f"{source}: missing column 'text'")
    ids = dataset["id"] if "id" in dataset.column_names else [None] * len(dataset)
    return [(n, i, t) for n, (i, t) in enumerate(zip(ids, dataset["text"], strict=True), start=1)]


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
