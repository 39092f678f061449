"""bench/gpu_check.py on the CPU at its smallest size: every phase runs, the counts are right, a failed check
exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SMOKE = ["--device", "cpu", "--size", "smoke", "--shape", "small"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_smoke_run_passes_every_check_and_counts_tokens_right(tmp_path):
    out = tmp_path / "check.json"
    result = run_script(*SMOKE, "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == ["peak", "parity", "unlearn", "score", "el", "scan", "step"]
    assert report["passed"] and all(p["passed"] is not False for p in phases.values())
    assert "all checks passed" in result.stdout and "| parity |" in result.stdout

    # (a) CPU float32 against CPU float32: the same numbers, bit for bit
    parity = phases["parity"]["details"]
    assert parity["identical"] == parity["sequences"] == 40 and parity["max_logit_difference"] == 0
    # (b) the model trained in the script memorizes (f0-f3 at least), and unlearning removes it all
    unlearn = phases["unlearn"]["details"]
    assert unlearn["target_reached"] and unlearn["stop_reason"].startswith("target reached")
    assert unlearn["extractable_before_after"][0] >= 4 and unlearn["extractable_before_after"][1] == 0
    assert unlearn["method"] == "hinge" and unlearn["target"] == "indistinguishable"  # the defaults

    # (c) tokens are the real ones: score 4 x 32; scan 8 windows of 64 (the scan's own tally); the loop trains,
    # per step, 2 forget + 2 retain + 2 neighbour sequences of 24 tokens
    sizes = report["sizes"]
    assert phases["score"]["tokens"] == sizes["score_sequences"] * sizes["score_tokens"] == 128
    assert phases["scan"]["tokens"] == phases["scan"]["details"]["windows"] * 64 == 512
    step = phases["step"]
    assert step["details"]["timed_steps"] == sizes["steps"] == 2 and step["details"]["steps"] == 3
    assert step["tokens"] == 2 * 3 * 2 * 24
    n_params = report["machine"]["throughput_model"]["parameters"]
    # FLOPs: 2 N per forward token, 4 N more per token with gradient
    assert step["flops"] == 2 * n_params * step["details"]["forward_tokens_timed"] + 4 * n_params * step["tokens"]
    assert phases["score"]["flops"] == 2 * n_params * 128
    peak = phases["peak"]["details"]["tflops_per_s"] * 1e12
    for name in ("score", "el", "scan", "step"):
        phase = phases[name]
        assert phase["tokens_per_s"] > 0 and phase["peak_memory_mib"] > 0 and 0 < phase["mfu"] <= 1
    for name in ("score", "el", "scan"):  # MFU = FLOPs / seconds / the measured peak (the loop: its timed steps)
        phase = phases[name]
        assert abs(phase["mfu"] / (phase["flops"] / phase["seconds"] / peak) - 1) < 1e-9


def test_a_failed_check_exits_1_and_bad_input_exits_2(tmp_path, capsys):
    """In this process (the script's main), to save the start of a second one."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    out = tmp_path / "check.json"
    # (b) with no step allowed cannot reach the target: the check fails, the script says so
    assert gpu_check.main([*SMOKE, "--only", "unlearn", "--max-steps", "0", "--json", str(out)]) == 1
    assert "CHECK FAILED" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (phase,) = report["phases"]
    assert not report["passed"] and phase["passed"] is False and phase["error"] is None
    assert phase["details"]["steps"] == 0 and not phase["details"]["target_reached"]
    assert phase["details"]["trained_model_memorizes"]  # the model was fine: only the unlearning fell short

    with pytest.raises(SystemExit) as exit_status:
        gpu_check.main(["--only", "nope"])
    assert exit_status.value.code == 2
