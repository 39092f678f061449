"""Loading sets: every format, and every bad input as one line naming file, line and reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unmemorize.errors import InputError
from unmemorize.io.sets import load_set


def test_formats_load_the_same_sequences(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "alpha"}\n\n{"text": "beta"}\n')
    (tmp_path / "a.csv").write_text('id,text\nx,alpha\n,beta\n')
    (tmp_path / "a.txt").write_text("alpha\n\n   \nbeta\n")
    pq.write_table(pa.table({"id": ["x", None], "text": ["alpha", "beta"]}), tmp_path / "a.parquet")
    assert [(s.id, s.text) for s in load_set(tmp_path / "a.jsonl")] == [("x", "alpha"), ("3", "beta")]
    assert [(s.id, s.text) for s in load_set(tmp_path / "a.csv")] == [("x", "alpha"), ("3", "beta")]
    assert [(s.id, s.text) for s in load_set(tmp_path / "a.txt")] == [("1", "alpha"), ("4", "beta")]
    assert [(s.id, s.text) for s in load_set(tmp_path / "a.parquet")] == [("x", "alpha"), ("2", "beta")]


def test_integer_ids_become_strings(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 7, "text": "alpha"}) + "\n")
    assert load_set(tmp_path / "a.jsonl")[0].id == "7"


BAD = [
    ("missing.jsonl", None, "missing.jsonl: file not found"),
    ("a.xml", "<x/>", "unknown file type .xml"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "ok2"\n', "a.jsonl:2: bad JSON"),
    ("a.jsonl", '{"text": "ok"}\n[1, 2]\n', "a.jsonl:2: expected a JSON object"),
    ("a.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "a.jsonl:2: missing field 'text'"),
    ("a.jsonl", '{"text": "ok"}\n{"text": "  "}\n', "a.jsonl:2: empty text"),
    ("a.jsonl", '{"text": 5}\n', "a.jsonl:1: field 'text' must be a string"),
    ("a.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
     "a.jsonl:2: duplicate id 'a' (first on line 1)"),
    ("a.jsonl", "\n\n", "a.jsonl: empty set"),
    ("a.csv", "body\nx\n", "a.csv:1: missing column 'text'"),
    ("a.csv", "id,text\n1,x\n2,\n", "a.csv:3: empty text"),
    ("a.txt", "", "a.txt: empty set"),
    ("a.parquet", "not parquet", "a.parquet: not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD)
def test_bad_input_names_file_line_and_reason(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputError) as caught:
        load_set(tmp_path / name)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_not_utf8_names_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"a.jsonl:2: not UTF-8"):
        load_set(tmp_path / "a.jsonl")


def test_hf_source_reports_a_clean_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"^hf:no-such/dataset:train: cannot load dataset"):
        load_set("hf:no-such/dataset:train")


def test_hf_source_loads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    sequences = load_set(f"hf:{folder}:train")
    assert [(s.id, s.text) for s in sequences] == [("1", "alpha"), ("2", "beta")]


BOM = "\ufeff"


@pytest.mark.parametrize(("name", "content", "ids"), [
    ("a.jsonl", '{"id": "x", "text": "alpha"}\n{"text": "beta"}\n', ("x", "2")),
    ("a.csv", "id,text\nx,alpha\n,beta\n", ("x", "3")),
    ("a.txt", "alpha\nbeta\n", ("1", "2")),
], ids=["jsonl", "csv", "txt"])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
def test_windows_files_load_as_unix_ones(tmp_path, name, content, ids, bom, newline):
    """What Windows tools write (a UTF-8 byte-order mark, CRLF line ends) loads the same sequences."""
    (tmp_path / name).write_bytes(((BOM if bom else "") + content.replace("\n", newline)).encode("utf-8"))
    assert [(s.id, s.text) for s in load_set(tmp_path / name)] == [(ids[0], "alpha"), (ids[1], "beta")]


def test_bom_does_not_hide_the_line_of_bad_utf8(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(BOM.encode() + b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"a.jsonl:2: not UTF-8"):
        load_set(tmp_path / "a.jsonl")


def test_csv_quoted_fields_keep_commas_and_line_breaks(tmp_path):
    (tmp_path / "a.csv").write_bytes(b'id,text\r\na,"one, two\r\nthree"\r\n,"say ""hi"""\r\n\r\n,last\r\n')
    loaded = [(s.id, s.text) for s in load_set(tmp_path / "a.csv")]
    # the default id is the line the row starts on: the quoted line break counts as a line of the file
    assert loaded == [("a", "one, two\r\nthree"), ("4", 'say "hi"'), ("6", "last")]


def test_csv_row_after_a_multiline_field_is_named_by_its_own_line(tmp_path):
    (tmp_path / "a.csv").write_text('id,text\na,"one\ntwo"\nb,\n')
    with pytest.raises(InputError, match=r"a.csv:4: empty text"):
        load_set(tmp_path / "a.csv")


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    """JSON allows U+2028, U+0085 and form feeds raw inside a string: they are not line ends."""
    texts = ["alpha\u2028beta", "gamma\x85delta\x0cepsilon"]
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts)
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8", newline="")
    assert [s.text for s in load_set(tmp_path / "a.jsonl")] == texts


def test_loaded_set_remembers_its_source(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    assert load_set(tmp_path / "a.txt").source == str(tmp_path / "a.txt")
