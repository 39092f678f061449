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
