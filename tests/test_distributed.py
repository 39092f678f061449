"""Data-parallel unlearning: `torchrun --nproc_per_node 2` on CPU (gloo) gives the run of one process.

Each process scores every sequence, takes a shard of the active forget sequences for the gradient step and
scales its loss so that DDP's averaged gradient is the one-process gradient; only rank 0 writes. So the
trajectory, the per-sequence MA after and the utility must agree with a one-process run up to float
rounding (every process runs with one thread).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_cli

from unmemorize.io.sets import write_jsonl

TORCHRUN = Path(sys.executable).parent / "torchrun"
OPTIONS = ["--device", "cpu", "--dtype", "float32", "--method", "ga", "--stop", "steps", "--max-steps", "4",
           "--lr", "3e-4", "--el-n", "3", "--prefix-tokens", "8", "--max-utility-drop", "5"]
TOL = 1e-3


def arguments(tiny, general: Path, out: Path) -> list[str]:
    files = tiny["files"]
    return ["unlearn", "--model", str(tiny["model"]), "--forget", str(files["forget"]), "--holdout",
            str(files["holdout"]), "--retain", str(files["retain"]), "--general", str(general), *OPTIONS,
            "--out", str(out)]


def torchrun(args: list[str]) -> subprocess.Popen:
    # --standalone: a rendezvous on a free local port, so parallel test runs do not collide.
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "unmemorize", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_exit_codes(result_code: int, stderr: str) -> list[int]:
    """torchrun exits 0 when every rank did, else 1 and lists the failed ranks' exit codes."""
    return [] if result_code == 0 else [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)]


def read_run(out: Path) -> dict:
    return {
        "trajectory": [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()],
        "after": json.loads((out / "after.json").read_text()),
        "run": json.loads((out / "run.json").read_text()),
    }


def one_and_two_processes(args_of, tmp_path: Path, *, steps: int, keys: tuple[str, ...] = ("loss", "forget_loss")
                          ) -> tuple[dict, dict]:
    """Run `args_of(out)` in one process (one thread) and under `torchrun` with two at once; check both ended
    as the same run and agree at every step (active set, MA, the trajectory's `keys`); return both runs read."""
    launched = torchrun(args_of(tmp_path / "two"))  # both runs at once: the test is faster
    single = run_cli(*args_of(tmp_path / "one"), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    _, stderr = launched.communicate(timeout=300)
    codes = rank_exit_codes(launched.returncode, stderr)
    assert single.returncode in (0, 3), single.stderr[-3000:]
    if single.returncode == 0:
        assert launched.returncode == 0, stderr[-3000:]
    else:
        # Exit 3 (target not reached) is non-zero, so torchrun reports a failure and stops the ranks still
        # running (SIGTERM, -15): possible only after the first rank exited 3, i.e. after the run folder was
        # complete. Anything else (a crash, an abort at exit) fails the test.
        assert 3 in codes and set(codes) <= {3, -15}, (codes, stderr[-3000:])
    assert not (tmp_path / "two.partial").exists()

    one, two = read_run(tmp_path / "one"), read_run(tmp_path / "two")
    assert len(one["trajectory"]) == len(two["trajectory"]) == steps + 1
    for a, b in zip(one["trajectory"], two["trajectory"], strict=True):
        assert a["step"] == b["step"] and a["active"] == b["active"]
        for key in keys:  # the last line (the run stopped) has no loss
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert abs(a[key] - b[key]) < TOL, (a["step"], key, a[key], b[key])
        assert a["ma"].keys() == b["ma"].keys()
        assert all(abs(a["ma"][k] - b["ma"][k]) < TOL for k in a["ma"]), (a["ma"], b["ma"])
    assert one["run"]["tokens"]["backward"] == two["run"]["tokens"]["backward"]
    # the losses moved: the comparison is between trained models (step 0 is the same model in both)
    assert abs(one["trajectory"][2]["forget_loss"] - one["trajectory"][0]["forget_loss"]) > 10 * TOL
    return one, two


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_two_processes_match_one(tiny, tmp_path):
    general = tmp_path / "general.jsonl"
    write_jsonl(general, tiny["sets"]["holdout"])
    one, two = one_and_two_processes(lambda out: arguments(tiny, general, out), tmp_path, steps=4)

    def forget_scores(after):
        return {s["id"]: s for s in after["sequences"] if s["set"] == "forget"}

    forget_one, forget_two = forget_scores(one["after"]), forget_scores(two["after"])
    assert forget_one.keys() == forget_two.keys() and len(forget_one) == 8
    for name, a in forget_one.items():
        b = forget_two[name]
        assert abs(a["ma"] - b["ma"]) < TOL and abs(a["loss"] - b["loss"]) < TOL, (name, a, b)
    assert one["run"]["steps"] == two["run"]["steps"] == 4
    after_one, after_two = one["run"]["utility"]["after"], two["run"]["utility"]["after"]
    assert abs(after_one["general_ppl"] - after_two["general_ppl"]) < TOL * after_one["general_ppl"]
    assert abs(after_one["retain_ma"] - after_two["retain_ma"]) < TOL
    # The unlearning really moved the model (the comparison is not between two untouched models).
    before = {s["id"]: s for s in json.loads((tmp_path / "one" / "before.json").read_text())["sequences"]
              if s["set"] == "forget"}
    assert sum(forget_one[k]["loss"] - before[k]["loss"] for k in before) > 0.1
