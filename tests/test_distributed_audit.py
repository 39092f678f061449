"""Data-parallel audit: `torchrun --nproc_per_node 2 -m unmemorize audit` gives the audit of one process.

Each rank measures every second sequence of each set; the rows are gathered back into the input order and the
band, statuses and privacy AUCs are computed from all of them, so audit.json and audit.csv must match a
one-process audit: exactly, except the float32 measures (see FP32_MEASURES).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli

from unmemorize.io.tokens import pad_id_of
from unmemorize.measure.audit import AuditSettings, measure_rows, merge_shards

TORCHRUN = Path(sys.executable).parent / "torchrun"
# A rank batches its share of a set differently from one process, so a sequence is padded to another width
# and the float32 matmuls sum in another order: loss, zlib, Min-K% and Min-K%++ (means of float32
# log-probabilities and z-scores) can differ in the last bits. They are bitwise equal on an AVX-512/AMX CPU,
# but up to 3e-7 relative (1.6e-6 absolute) apart on an AVX2-only one. Allowed: 1e-6 relative (~8 float32
# ulps), with a 1e-6 absolute floor because Min-K%++ averages z-scores = (log p - mu) / sigma, float32
# differences of terms up to ~10 that can average to near 0 (0.02 seen), where only an absolute bound is
# meaningful. A wrong row (another sequence, a lost mask) is off by 1e-3 or far more.
# Everything else stays exact: MA, EL and verbatim count argmax hits (batch-independent unless two logits
# tie within rounding), the band and statuses come from MA alone (the loss band's edges come from the losses:
# compared like them), and the privacy AUCs, intervals and ROC
# points depend only on the order of forget vs holdout scores (apart by far more than 1e-6 here).
FP32_MEASURES = {"loss", "zlib", "mink", "minkpp", "mean_loss"}
FP32_REL = FP32_ABS = 1e-6


def arguments(tiny, out: Path) -> list[str]:
    files = tiny["files"]
    return ["audit", "--model", str(tiny["model"]), "--forget", str(files["forget"]), "--holdout",
            str(files["holdout"]), "--retain", str(files["retain"]), "--dtype", "float32", "--device", "cpu",
            "--el-n", "2", "--el-sets", "all", "--prefix-tokens", "8", "--batch-size", "3", "--out", str(out)]


def fp32_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=FP32_REL, abs_tol=FP32_ABS)


def assert_close(a, b, where: str = "", key: str = "") -> None:
    """Equal structure and equal values; the values under a key of FP32_MEASURES up to float32 rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for k in a:
            # the loss band's edges are statistics of the holdout's losses: float32 rounding, like the losses
            assert_close(a[k], b[k], f"{where}.{k}", "loss" if key == "loss_band" else k)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]", key)
    elif key in FP32_MEASURES and isinstance(a, float):
        assert isinstance(b, float) and fp32_close(a, b), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_two_processes_audit_like_one(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a rendezvous on a free local port, so parallel test runs do not collide.
    launched = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "unmemorize",
                                 *arguments(tiny, tmp_path / "two")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    single = run_cli(*arguments(tiny, tmp_path / "one"), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    stdout, stderr = launched.communicate(timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert launched.returncode == 0, stderr[-3000:]
    assert stdout.count("Wrote") == 1  # only rank 0 reports and writes

    one = json.loads((tmp_path / "one" / "audit.json").read_text())
    two = json.loads((tmp_path / "two" / "audit.json").read_text())
    assert one.keys() == two.keys()
    assert one["model"]["sha256"] == two["model"]["sha256"]
    for key in one.keys() - {"model"}:
        assert_close(one[key], two[key], key, key)
    assert [(s["set"], s["id"]) for s in one["sequences"]] == [(s["set"], s["id"]) for s in two["sequences"]]
    assert {s["set"] for s in one["sequences"]} == {"forget", "holdout", "retain"}
    assert one["privacy"] and one["band"] is not None

    def csv_rows(folder: Path) -> list[list[str]]:
        return list(csv.reader((folder / "audit.csv").read_text().splitlines()))

    rows_one, rows_two = csv_rows(tmp_path / "one"), csv_rows(tmp_path / "two")
    assert len(rows_one) == len(rows_two) == len(one["sequences"]) + 1
    for a, b in zip(rows_one, rows_two, strict=True):
        # set, id, hash, n_tokens, ma, el..., verbatim and status exactly; the float columns up to rounding
        assert [a[i] for i in (0, 1, 2, 3, 4, -1)] == [b[i] for i in (0, 1, 2, 3, 4, -1)], (a, b)


def test_shards_merge_to_the_one_process_rows(tiny_loaded, tiny):
    """Three shards of sets of uneven sizes (one shard of a set empty) merge back into the one-process rows."""
    model, tokenizer, runtime = tiny_loaded
    sets = {"forget": tiny["sets"]["forget"][:5], "holdout": tiny["sets"]["holdout"][:2],
            "retain": tiny["sets"]["retain"][:1]}
    settings = AuditSettings(max_tokens=32, prefix_tokens=8, el_n=[2], batch_size=2, el_sets=None)
    pad_id = pad_id_of(tokenizer)
    whole = measure_rows(model, tokenizer, sets, settings, runtime, pad_id)
    parts = [measure_rows(model, tokenizer, sets, settings, runtime, pad_id, (rank, 3)) for rank in range(3)]
    assert [len(p) for p in parts] == [4, 3, 1]
    merged = merge_shards(parts, sets)
    assert [(r.set, r.id) for r in merged] == [(r.set, r.id) for r in whole]
    for a, b in zip(merged, whole, strict=True):
        assert (a.n_tokens, a.ma, a.el, a.verbatim) == (b.n_tokens, b.ma, b.el, b.verbatim)
        for k in ("loss", "zlib", "mink", "minkpp"):  # float32 rounding of other batches (see FP32_MEASURES)
            assert fp32_close(getattr(a, k), getattr(b, k)), (a.set, a.id, k, getattr(a, k), getattr(b, k))
