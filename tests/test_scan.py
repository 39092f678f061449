"""`scan` on the tiny memorizing model: a corpus hides the memorized records f0-f3 among hundreds of unseen
sentences (and the holdout h0-h19); the scan must rank f0-f3 first, in bounded memory, and give the same top K
after a kill and --resume, after Ctrl-C and --resume, and in two processes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from test_distributed import TORCHRUN, rank_exit_codes
from tiny import sentences

from unmemorize import cli
from unmemorize.io.corpus import Corpus, open_corpus
from unmemorize.io.sets import Sequence, load_set
from unmemorize.io.tokens import encode
from unmemorize.measure import scoring
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.scoring import lean_scores, score_tokens
from unmemorize.runs.scan import Hit, ScanSettings, TopK, prepared_shards, scan, window_starts

FLOAT32 = ["--device", "cpu", "--dtype", "float32"]
# 16-token windows over 16-24-token records: each record gives a window at 0 and one ending with it
OPTIONS = ["--top", "10", "--window", "16", "--prefix-tokens", "8", "--shard-docs", "50", *FLOAT32]
SETTINGS = ScanSettings(top=10, window=16, prefix_tokens=8, shard_docs=50)
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}  # one thread in every run: the same float sums, the same ranking
STATE = ".scan-state.0-of-1.json"

# The real command line with a pause after each checkpoint, so a test can stop it between two shards.
SLOW_CHECKPOINTS = """
import signal
import time
# A shell starts background jobs with SIGINT ignored and Python keeps that: restore Ctrl-C as a terminal has it.
signal.signal(signal.SIGINT, signal.default_int_handler)
import unmemorize.runs.scan as scan
save = scan.save_state
def slow(*args):
    save(*args)
    time.sleep(0.15)
scan.save_state = slow
from unmemorize.cli import main
main()
"""


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory) -> Path:
    """624 documents: f0-f3 (memorized), h0-h19 (holdout) and 600 unseen sentences, shuffled."""
    rows = [{"id": f"u{i}", "text": text} for i, text in enumerate(sentences(600, seed=7))]
    rows += [{"id": s.id, "text": s.text} for s in tiny["sets"]["holdout"] + tiny["sets"]["forget"][:4]]
    random.Random(1).shuffle(rows)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def whole(tiny, corpus, tmp_path_factory) -> Path:
    """An uninterrupted scan through the command line: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "scan"
    result = run_cli("scan", "--model", tiny["model"], "--corpus", corpus, *OPTIONS, "--out", out, env=SINGLE_THREAD)
    assert result.returncode == 0, result.stderr
    return out


def read_scan(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "scan.json").read_text())


COUNTS = ("documents", "windows", "tokens", "verbatim_windows", "skipped_records", "short_documents", "ma_histogram")


def test_scan_finds_the_memorized_records_first(tiny, tiny_loaded, corpus, tmp_path):
    model, tokenizer, runtime = tiny_loaded
    result = scan(model, tokenizer, open_corpus(str(corpus)), SETTINGS, runtime, tmp_path / "scan")
    rows, summary = read_scan(tmp_path / "scan")
    assert rows == result.top and len(rows) == 10

    sources = [row["source_id"] for row in rows]
    assert set(sources[:4]) == {"f0", "f1", "f2", "f3"}, sources
    assert not any(s.startswith("h") for s in sources[:4])
    assert all(row["verbatim"] for row in rows[:4]) and rows[0]["ma"] > 0.9 > rows[4]["ma"]
    keys = [(row["ma"], -row["loss"]) for row in rows]
    assert keys == sorted(keys, reverse=True)

    assert summary["complete"] is True and summary["documents"] == 624 and summary["skipped_records"] == 0
    assert summary["top"] == 10 and summary["tokens"] == 16 * summary["windows"]
    histogram, edges = summary["ma_histogram"], summary["ma_histogram_edges"]
    assert len(edges) == len(histogram) + 1 and sum(histogram) == summary["windows"]
    assert summary["tokens_per_s"] > 0 and summary["settings"]["window"] == 16
    assert not list((tmp_path / "scan").glob(".scan-state*"))  # a complete scan leaves no checkpoint

    # top.jsonl is a forget set as it is, and an audit of it measures what the scan measured.
    forget = load_set(tmp_path / "scan" / "top.jsonl")
    assert [s.id for s in forget] == [row["id"] for row in rows]
    audited = audit(model, tokenizer, {"forget": forget}, AuditSettings(prefix_tokens=8, el_n=[]), runtime)
    for row, measured in zip(rows, audited.sequences, strict=True):
        assert measured.n_tokens == 16 and measured.ma == row["ma"] and measured.verbatim == row["verbatim"]
        assert abs(measured.loss - row["loss"]) < 1e-5 and abs(measured.zlib - row["zlib"]) < 1e-5


def test_lean_scores_are_score_tokens_without_min_k(tiny_loaded, monkeypatch):
    model, tokenizer, runtime = tiny_loaded
    token_lists = encode(tokenizer, [Sequence(str(n), t) for n, t in enumerate(sentences(12, seed=11))], 64)
    full = score_tokens(model, token_lists, runtime, 4, 0)
    for chunk_bytes in (scoring.CHUNK_BYTES, 1):  # 1: one position per chunk
        monkeypatch.setattr(scoring, "CHUNK_BYTES", chunk_bytes)
        for a, b in zip(full, lean_scores(model, token_lists, runtime, 4, 0), strict=True):
            assert (a.hits == b.hits).all() and np.allclose(a.logprobs, b.logprobs, atol=1e-5)
            assert a.ma == b.ma and a.verbatim(8) == b.verbatim(8) and abs(a.loss - b.loss) < 1e-5


def test_a_tie_goes_to_the_lowest_token_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    hits, logprobs = scoring._hits_and_logprobs(logits.bfloat16(), torch.tensor([2, 0, 2]))
    assert hits.tolist() == [False, True, True]
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1, 2], [2, 0, 2]])


def test_windows_cover_each_document():
    assert window_starts(40, 16, 16, 4) == [0, 16, 24]  # the tail is a full window ending with the document
    assert window_starts(32, 16, 16, 4) == [0, 16]
    assert window_starts(40, 16, 8, 4) == [0, 8, 16, 24]
    assert window_starts(40, 16, 30, 4) == [0, 24]  # stride > window samples the document
    assert window_starts(10, 16, 16, 4) == [0]  # a short document is one window of all its tokens
    assert window_starts(3, 16, 16, 4) == []  # too short to score


def hit(ma: float, loss: float, position: int, digest: str) -> Hit:
    return Hit(id=f"d{position}", text="t", source_id=f"d{position}", start_token=0, end_token=2, ma=ma,
               verbatim=False, loss=loss, zlib=0.0, position=position, digest=digest)


def test_top_k_is_the_same_in_any_order_and_split():
    rng = random.Random(0)
    hits = [hit(rng.choice([0.25, 0.5, 0.75, 1.0]), rng.random(), i, f"x{rng.randrange(60)}") for i in range(300)]
    whole = TopK(7, hits).ranked()
    assert len(whole) == 7 and len({h.digest for h in whole}) == 7  # a repeated passage is kept once
    for _ in range(5):
        rng.shuffle(hits)
        parts = [TopK(7, hits[i::3]) for i in range(3)]
        assert TopK(7, [h for part in parts for h in part.ranked()]).ranked() == whole
    best_copy = {}
    for h in hits:
        best_copy[h.digest] = max(best_copy.get(h.digest, h), h, key=lambda c: c.key)
    assert whole == sorted(best_copy.values(), key=lambda c: c.key, reverse=True)[:7]


def test_every_format_streams_the_same_documents(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(30, seed=3)
    ids = [f"doc{i}" for i in range(30)]
    rows = [{"id": i, "body": t} for i, t in zip(ids, texts, strict=True)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "c.csv").write_text("id,body\n" + "".join(f"{i},{t}\n" for i, t in zip(ids, texts, strict=True)))
    pq.write_table(pa.table({"id": ids, "body": texts}), tmp_path / "c.parquet", row_group_size=7)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")

    def read(corpus: Corpus) -> list[tuple[int, str, str]]:
        documents = [corpus.document(index * 8 + n, record) for index, records in corpus.shards(8)
                     for n, record in enumerate(records)]
        return [(d.position, d.id, d.text) for d in documents]

    expected = [(n, doc_id, text) for n, (doc_id, text) in enumerate(zip(ids, texts, strict=True))]
    for name in ("c.jsonl", "c.csv", "c.parquet"):
        assert read(open_corpus(str(tmp_path / name), text_field="body")) == expected, name
    by_line = read(open_corpus(str(tmp_path / "c.txt")))
    assert [(p, t) for p, _, t in by_line] == [(p, t) for p, _, t in expected]
    assert [i for _, i, _ in by_line] == [str(n) for n in range(1, 31)]

    calls = []

    def load_dataset(name, split, streaming):  # no network: what the hf: path asks of `datasets`
        calls.append((name, split, streaming))
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read(open_corpus("hf:some/corpus:validation", text_field="body")) == expected
    assert calls and all(call == ("some/corpus", "validation", True) for call in calls)


def test_malformed_records_are_counted_and_skipped(tiny_loaded, tmp_path):
    lines = [json.dumps({"text": t}) for t in sentences(6, seed=5)]
    lines[2], lines[4] = "{not json", json.dumps({"other": "field"})
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, tokenizer, _ = tiny_loaded
    shards = list(prepared_shards(open_corpus(str(path)), tokenizer, threading.Lock(), SETTINGS))
    assert [(s.documents, s.skipped) for s in shards] == [(4, 2)]
    assert [w.source_id for w in shards[0].windows if w.start == 0] == ["1", "2", "4", "6"]  # ids: line numbers


def lazy_corpus(documents: int) -> Corpus:
    """A corpus made on the fly by a generator: never a list, whatever its size."""

    def records():
        rng = random.Random(documents)
        for n in range(1, documents + 1):
            yield n, {"text": " ".join(f"k{k} v{rng.randrange(48)}" for k in range(12))}

    return Corpus("<generator>", records, lambda r: (str(r[0]), r[1]["text"]), {"source": "<generator>"})


def test_memory_stays_bounded_as_the_corpus_grows(tiny_loaded, tmp_path, monkeypatch):
    model, tokenizer, runtime = tiny_loaded
    largest = []
    offer = TopK.offer

    def watched(self, hit):
        offer(self, hit)
        largest.append(len(self))

    monkeypatch.setattr(TopK, "offer", watched)
    settings = ScanSettings(top=5, window=16, prefix_tokens=8, shard_docs=25)
    scan(model, tokenizer, lazy_corpus(100), settings, runtime, tmp_path / "warm-up")  # one-time allocations
    peaks = {}
    for documents in (300, 1200):
        tracemalloc.start()
        result = scan(model, tokenizer, lazy_corpus(documents), settings, runtime, tmp_path / str(documents))
        peaks[documents] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.summary["documents"] == documents and result.summary["windows"] == 2 * documents
    assert max(largest) == 5  # the top K never holds more than K windows
    # 4x the documents, about the same peak: a few shards (the one scored, the one tokenized ahead) and the
    # top K. The peak moves with the timing of the two threads; keeping every window would multiply it by 4.
    assert peaks[1200] < 2 * peaks[300], peaks


def slow_scan(tiny, corpus: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_CHECKPOINTS, "scan", "--model", str(tiny["model"]),
                             "--corpus", str(corpus), *OPTIONS, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SINGLE_THREAD})


def wait_for_shards(out: Path, shards: int, process: subprocess.Popen) -> None:
    """Until the checkpoint says `shards` shards are done (13 in all)."""
    state = out / STATE
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["next_shard"] >= shards:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of {shards} shards (exit {process.poll()})")


def test_a_killed_scan_resumes_to_the_same_top(tiny, corpus, whole, tmp_path):
    out = tmp_path / "killed"
    process = slow_scan(tiny, corpus, out)
    wait_for_shards(out, 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "top.jsonl").exists()

    resumed = run_cli("scan", "--model", tiny["model"], "--corpus", corpus, *OPTIONS, "--out", out, "--resume",
                      env=SINGLE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    rows, summary = read_scan(out)
    expected_rows, expected = read_scan(whole)
    assert rows == expected_rows
    assert {k: summary[k] for k in COUNTS} == {k: expected[k] for k in COUNTS}
    assert not (out / STATE).exists()


def test_ctrl_c_writes_what_it_has_and_exits_130(tiny, corpus, whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    process = slow_scan(tiny, corpus, out)
    wait_for_shards(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    rows, summary = read_scan(out)
    assert summary["complete"] is False and 0 < summary["windows"] < read_scan(whole)[1]["windows"]
    assert len(rows) == 10 and (out / STATE).exists()

    # The checkpoint stays: --resume finishes the scan, as if never stopped; only with the same settings.
    other = ["scan", "--model", str(tiny["model"]), "--corpus", str(corpus), *OPTIONS, "--out", str(out), "--resume"]
    code, stderr = run_main([*other, "--top", "5"], monkeypatch, capsys)
    assert code == 2 and "--resume: the settings, model or corpus differ" in stderr
    resumed = run_cli("scan", "--model", tiny["model"], "--corpus", corpus, *OPTIONS, "--out", out, "--resume",
                      env=SINGLE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert read_scan(out)[0] == read_scan(whole)[0] and read_scan(out)[1]["complete"] is True


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_two_processes_give_the_top_of_one(tiny, corpus, whole, tmp_path):
    out = tmp_path / "two"
    launched = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "unmemorize", "scan",
                               "--model", str(tiny["model"]), "--corpus", str(corpus), *OPTIONS, "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **SINGLE_THREAD})
    assert launched.returncode == 0, (rank_exit_codes(launched.returncode, launched.stderr), launched.stderr[-3000:])
    rows, summary = read_scan(out)
    expected_rows, expected = read_scan(whole)
    assert rows == expected_rows
    assert {k: summary[k] for k in COUNTS} == {k: expected[k] for k in COUNTS}
    assert summary["processes"] == 2 and summary["complete"] is True
    assert not list(out.glob(".scan-state*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "{missing}"], "file not found"),
    (["--corpus", "{folder}"], "is a folder"),
    (["--corpus", "{empty}"], "empty corpus"),
    (["--corpus", "{not_json}"], ":1: bad JSON"),
    (["--text-field", "body"], "no field 'body' (--text-field)"),
    (["--id-field", "doc"], "no field 'doc' (--id-field)"),
    (["--top", "0"], "--top"),
    (["--window", "1"], "--window"),
    (["--stride", "0"], "--stride"),
    (["--shard-docs", "0"], "--shard-docs"),
    (["--resume"], "--resume: no interrupted scan"),
    (["--device", "tpu"], "--device"),
    (["--window", "1000"], "exceed the model's context of 128"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, corpus, tmp_path, monkeypatch, capsys, args,
                                                            message):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "not.jsonl").write_text("text: hello\n")
    paths = {"missing": tmp_path / "nope.jsonl", "folder": tmp_path, "empty": tmp_path / "empty.jsonl",
             "not_json": tmp_path / "not.jsonl"}
    out = tmp_path / "out"
    argv = ["scan", "--model", str(tiny["model"]), "--corpus", str(corpus), "--out", str(out)]
    argv += [a.format(**paths) for a in args]
    code, stderr = run_main(argv, monkeypatch, capsys)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists()


def test_an_existing_scan_is_never_overwritten(tiny, corpus, whole, monkeypatch, capsys):
    before = (whole / "top.jsonl").read_text()
    argv = ["scan", "--model", str(tiny["model"]), "--corpus", str(corpus), "--out", str(whole)]
    code, stderr = run_main(argv, monkeypatch, capsys)
    assert code == 2 and "already holds a scan" in stderr
    assert (whole / "top.jsonl").read_text() == before


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The command line in this process (bad input fails before any model loads: no need for a subprocess)."""
    monkeypatch.setattr(sys, "argv", ["unmemorize", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err
