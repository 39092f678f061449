"""A corpus of any size, read as a stream of documents (JSONL, CSV, Parquet, .txt, hf:NAME[:SPLIT]).

`data.load_set` loads a set whole and rejects it at its first flaw: right for a forget set of a few hundred
sequences. A training corpus is read once, front to back, and never held: records come one at a time (lines,
Parquet record batches, a streaming `datasets` split) and a malformed record is counted and skipped instead of
stopping a scan hours in. Only the first record is checked strictly, before any work: a wrong `--text-field`
or `--id-field`, or a file that is not what its suffix says, fails there.

Records are split in two steps so that skipping is cheap: `records()` yields them raw (a line's bytes, a
row's dict), `parse` makes a Document of one. Resuming a scan, or taking every n-th shard in one of n
processes, reads the skipped shards without parsing them.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .sets import SUFFIXES, checked_file

PARQUET_BATCH_ROWS = 1024

# (line or row number, 1-based: how an error names the place; the record as read)
Record = tuple[int, object]


@dataclass(frozen=True)
class Document:
    position: int  # 0-based record number in the corpus: shards, resume and ranking ties go by it
    id: str  # the id field, else the line (row) number, as data.load_set names sequences
    text: str


class Malformed(ValueError):
    """A record that holds no document: counted and skipped, except as the first record (bad input)."""


@dataclass(frozen=True)
class Corpus:
    source: str
    records: Callable[[], Iterator[Record]]  # a fresh pass over the raw records
    parse: Callable[[Record], tuple[str, str]]  # (id, text) of a record, or raises Malformed
    identity: dict  # what a resumed scan checks it reads the same corpus by

    def shards(self, size: int, rank: int = 0, world: int = 1, first: int = 0) -> Iterator[tuple[int, list[Record]]]:
        """(index, raw records) of the shards of `size` records that belong to process `rank` of `world`
        (index % world == rank), from shard `first` on. The others are read, not parsed."""
        stream = self.records()
        for index in itertools.count():
            records = list(itertools.islice(stream, size))
            if not records:
                return
            if index >= first and index % world == rank:
                yield index, records

    def document(self, position: int, record: Record) -> Document:
        doc_id, text = self.parse(record)
        return Document(position, doc_id, text)


def open_corpus(source: str, text_field: str = "text", id_field: str | None = None) -> Corpus:
    """A corpus from a file or `hf:NAME[:SPLIT]`; its first record is read and checked (InputError if bad).

    `id_field` None: the field "id" when a record has it, else the line (row) number. Given: every record
    must have it.
    """
    source = str(source)
    if source.startswith("hf:"):
        corpus = _hf_corpus(source, text_field, id_field)
    else:
        corpus = _file_corpus(source, text_field, id_field)
    try:
        first = next(corpus.records(), None)
    except InputError:
        raise
    except Exception as error:  # unreadable file; for hf: network, missing dataset, bad split (all user-fixable)
        raise InputError(f"{source}: cannot read ({type(error).__name__}: {error})".splitlines()[0]) from None
    if first is None:
        raise InputError(f"{source}: empty corpus (no records)")
    try:
        corpus.parse(first)
    except Malformed as problem:
        raise InputError(f"{source}:{first[0]}: {problem}") from None
    return corpus


def _file_corpus(source: str, text_field: str, id_field: str | None) -> Corpus:
    path, suffix = checked_file(source, SUFFIXES)
    stat = path.stat()
    identity = {"source": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fields = _field_reader(text_field, id_field)
    if suffix == ".txt":
        return Corpus(source, lambda: _lines(path), _text_line, identity)
    if suffix == ".csv":
        return Corpus(source, lambda: _csv_rows(path, source), fields, identity)
    if suffix == ".parquet":
        _check_parquet(path, text_field, id_field)
        return Corpus(source, lambda: _parquet_rows(path, text_field, id_field), fields, identity)
    return Corpus(source, lambda: _lines(path), lambda record: fields(_json_object(record)), identity)


def _lines(path: Path) -> Iterator[Record]:
    """Non-blank lines as bytes: decoding and JSON parsing wait for `parse`, so skipped shards cost no parsing.
    A UTF-8 byte-order mark (what Windows tools write) is not part of the first line."""
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line_no == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield line_no, line


def _decoded(record: Record) -> str:
    try:
        return record[1].decode("utf-8")  # type: ignore[union-attr]
    except UnicodeDecodeError:
        raise Malformed("not UTF-8") from None


def _text_line(record: Record) -> tuple[str, str]:
    return str(record[0]), _decoded(record).rstrip("\r\n")


def _json_object(record: Record) -> Record:
    try:
        obj = json.loads(_decoded(record))
    except json.JSONDecodeError as error:
        raise Malformed(f"bad JSON ({error.msg})") from None
    if not isinstance(obj, dict):
        raise Malformed(f"expected a JSON object, got {type(obj).__name__}")
    return record[0], obj


def _field_reader(text_field: str, id_field: str | None) -> Callable[[Record], tuple[str, str]]:
    def fields(record: Record) -> tuple[str, str]:
        line_no, row = record
        assert isinstance(row, dict)
        if text_field not in row:
            raise Malformed(f"no field {text_field!r} (--text-field)")
        text = row[text_field]
        if not isinstance(text, str):
            raise Malformed(f"field {text_field!r} is not a string")
        if id_field is not None and id_field not in row:
            raise Malformed(f"no field {id_field!r} (--id-field)")
        raw_id = row.get(id_field or "id")
        return (str(line_no) if raw_id is None or raw_id == "" else str(raw_id)), text

    return fields


def _csv_rows(path: Path, source: str) -> Iterator[Record]:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, row  # the file's line number (header is line 1), as data.load_set


def _check_parquet(path: Path, text_field: str, id_field: str | None) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except Exception as error:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    for field, option in ((text_field, "--text-field"), (id_field, "--id-field")):
        if field is not None and field not in names:
            raise InputError(f"{path}: no column {field!r} ({option}); columns: {', '.join(names)}")


def _parquet_rows(path: Path, text_field: str, id_field: str | None) -> Iterator[Record]:
    """Rows one record batch at a time: a file of any size never sits in memory whole."""
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    wanted = [name for name in (text_field, id_field or "id") if name in handle.schema_arrow.names]
    row_no = 0
    for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _hf_corpus(source: str, text_field: str, id_field: str | None) -> Corpus:
    name, _, split = source[3:].partition(":")
    if not name:
        raise InputError(f"{source}: expected hf:NAME[:SPLIT]")
    import datasets

    from .hub import hub_access

    def rows() -> Iterator[Record]:
        # streaming=True: records arrive as they download (or, without the hub, as they are read from the local
        # cache); nothing is cached or loaded whole
        if Path(name).exists():  # a local dataset folder or file: no hub
            dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
        else:
            with hub_access(source) as hub:
                try:
                    dataset = datasets.load_dataset(name, split=split or "train", streaming=True)
                except OSError:  # ConnectionError: not cached, while the hub cannot be reached
                    if hub.offline:
                        raise InputError(f"{source}: cannot read: {hub.reason()}") from None
                    raise
        yield from enumerate(dataset, start=1)

    return Corpus(source, rows, _field_reader(text_field, id_field), {"source": source})
