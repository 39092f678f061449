"""Unlearning on the tiny memorizing model: every method, per-sequence selection, stop rules, safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from clirun import run_cli

from unmemorize.io.models import folder_sha256, load_model, make_runtime
from unmemorize.io.sets import Sequence, write_jsonl
from unmemorize.measure.utility import utility_drop
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.methods import FAMILIES, METHODS
from unmemorize.unlearning.methods.ascent import Ascent
from unmemorize.unlearning.methods.task_vector import TaskVector, line_search

FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}
RUNTIME = make_runtime("cpu", "float32")


def run(tiny, general, out, **options):
    """A run with `options`; target `ma` unless given (what these tests of each method's behaviour assume)."""
    settings = UnlearnSettings(**{"audit": FAST_AUDIT, "target": "ma", **options})
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    return unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, out)


METHOD_OPTIONS = {
    "ga": {"lr": 3e-4}, "gd": {"lr": 3e-4}, "ga_kl": {"lr": 3e-4}, "npo": {"lr": 1e-3}, "npo_gd": {"lr": 1e-3},
    "npo_kl": {"lr": 1e-3}, "idk": {"lr": 1e-3}, "rmu": {"lr": 1e-2}, "sga": {"lr": 3e-4}, "ta": {"lr": 3e-3},
    "tau": {"lr": 3e-3}, "sgatau": {"lr": 3e-4}, "simnpo": {"lr": 1e-3}, "simnpo_gd": {"lr": 1e-3},
    "ssimnpo": {"lr": 1e-3}, "undial": {"lr": 1e-3}, "wga": {"lr": 1e-3}, "wga_gd": {"lr": 1e-3},
    "satimp": {"lr": 1e-3}, "satimp_gd": {"lr": 3e-3}, "ce_u": {"lr": 1e-3}, "hinge": {"lr": 1e-3},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_lowers_forget_ma_and_leaves_the_input_model_alone(tiny, general, tmp_path, method):
    before_hash = folder_sha256(tiny["model"])
    options = {"method": method, "stop": "steps", "max_steps": 5, "max_utility_drop": 10.0, **METHOD_OPTIONS[method]}
    if method == "sgatau":
        options["max_steps"] = 2  # sga stops early; tau finishes the job
    result = run(tiny, general, tmp_path / "out", **options)
    assert result.after.summary("forget")["mean_ma"] < result.before.summary("forget")["mean_ma"] - 0.02
    assert folder_sha256(tiny["model"]) == before_hash
    out = tmp_path / "out"
    assert {"model", "before.json", "after.json", "run.json", "trajectory.jsonl"} <= {p.name for p in out.iterdir()} \
        or METHODS[method].stages == (TaskVector,)
    assert not (tmp_path / "out.partial").exists()
    reloaded, _ = load_model(out / "model", RUNTIME)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_sga_gives_gradient_only_to_sequences_above_the_band_and_stops_at_the_target(tiny, general, tmp_path,
                                                                                      monkeypatch):
    batches: list[list[int]] = []
    original_loss = Ascent.loss

    def recording_loss(self, ctx, forget, retain):
        batches.append(list(forget.indices))
        return original_loss(self, ctx, forget, retain)

    monkeypatch.setattr(Ascent, "loss", recording_loss)
    result = run(tiny, general, tmp_path / "out", method="sga", lr=3e-4, retain_loss="nll", max_steps=60,
                 max_utility_drop=10.0, recalibrate_every=1)
    lines = [json.loads(line) for line in (tmp_path / "out" / "trajectory.jsonl").read_text().splitlines()]
    names = [s.id for s in tiny["sets"]["forget"]]
    assert len(batches) == result.run["steps"] == len(lines) - 1
    for line, batch in zip(lines, batches, strict=False):
        upper = line["band"][1]
        above = {name for name, ma in line["ma"].items() if ma > upper}
        got = {names[i] for i in batch}
        assert above <= got == set(line["active"])  # + sequences in band but still verbatim
        assert len(got) < len(names) or line["step"] == 0 or above == got
    assert len(set(map(tuple, batches))) > 1  # the active set shrank as sequences entered the band
    assert result.run["stop_reason"].startswith("target reached")
    assert result.target_reached and result.after.summary("forget")["extractable"] == 0


def test_line_search_returns_the_smallest_lambda_that_meets_the_target():
    calls = []

    def reached(lam):
        calls.append(lam)
        return lam >= 1.37

    failed, lam = line_search(reached, high=4.0, tol=0.01)
    assert 1.37 <= lam <= 1.38 and 1.36 <= failed < 1.37
    assert line_search(lambda lam: False, high=4.0) == (4.0, None)
    assert line_search(lambda lam: True, high=4.0, tol=0.01)[1] <= 0.01


def test_tau_reaches_the_target_with_the_smallest_lambda(tiny, general, tmp_path):
    result = run(tiny, general, tmp_path / "out", method="tau", lr=3e-3, max_utility_drop=10.0)
    assert result.target_reached, result.run["stop_reason"]
    assert 0 < result.run["lambda"] < 4.0
    # a clearly smaller lambda leaves something above the band
    smaller = run(tiny, general, tmp_path / "smaller", method="tau", lr=3e-3, max_lambda=result.run["lambda"] * 0.5)
    assert not smaller.target_reached


def test_task_vector_keeps_the_largest_lambda_within_the_utility_guard(tiny, general, tmp_path):
    free = run(tiny, general, tmp_path / "free", method="ta", lr=3e-3, max_lambda=8.0, max_utility_drop=10.0)
    before = free.run["utility"]["before"]
    cost = utility_drop(before, free.run["utility"]["after"])
    assert cost > 0.02  # the unguarded lambda costs utility, so a guard below that cost must bite
    limit = cost / 2
    guarded = run(tiny, general, tmp_path / "guarded", method="ta", lr=3e-3, max_lambda=8.0, max_utility_drop=limit)
    assert "utility guard" in guarded.run["stop_reason"]
    assert 0 <= guarded.run["lambda"] < free.run["lambda"]
    assert utility_drop(before, guarded.run["utility"]["after"]) <= limit + 1e-6


def test_stop_mean_stops_on_the_aggregate_rule(tiny, general, tmp_path):
    # gd: the retain term keeps the record format, so only what was memorized goes down
    result = run(tiny, general, tmp_path / "out", method="gd", lr=3e-4, stop="mean", max_utility_drop=10.0,
                 recalibrate_every=1)
    assert "aggregate" in result.run["stop_reason"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "trajectory.jsonl").read_text().splitlines()]
    means = [np.mean(list(line["ma"].values())) for line in lines]
    assert means[-1] < lines[-1]["holdout_mean"]  # stopped as soon as the forget mean fell under the holdout mean
    assert all(m >= line["holdout_mean"] for m, line in zip(means[:-1], lines[:-1], strict=True))
    assert len(lines) > 2


def test_utility_guard_trips_on_divergence_and_restores_the_best_step(tiny, general, tmp_path):
    result = run(tiny, general, tmp_path / "out", method="ga", lr=5e-2, stop="steps", max_steps=40, guard_every=2)
    assert "utility guard" in result.run["stop_reason"] or "diverged" in result.run["stop_reason"]
    assert result.run["restored_step"] is not None and result.run["restored_step"] < result.run["steps"]
    before, after = result.run["utility"]["before"], result.run["utility"]["after"]
    assert after["general_ppl"] <= before["general_ppl"] * 1.10 + 1e-6  # the restored state passed the guard


def test_mask_fraction_changes_only_that_fraction_of_weights(tiny, general, tmp_path):
    result = run(tiny, general, tmp_path / "out", method="ga", lr=3e-4, stop="steps", max_steps=3, mask_fraction=0.05,
                 max_utility_drop=10.0)
    original, _ = load_model(tiny["model"], RUNTIME)
    unlearned, _ = load_model(tmp_path / "out" / "model", RUNTIME)
    changed = total = 0
    for a, b in zip(original.parameters(), unlearned.parameters(), strict=True):
        changed += int((a != b).sum())
        total += a.numel()
    assert 0 < changed <= 0.05 * total + 1
    assert result.after.summary("forget")["mean_ma"] < result.before.summary("forget")["mean_ma"]


def test_lora_trains_adapters_and_saves_a_plain_merged_model(tiny, general, tmp_path):
    result = run(tiny, general, tmp_path / "out", method="ga", lr=3e-3, stop="steps", max_steps=4, lora=4,
                 max_utility_drop=10.0)
    files = {p.name for p in (tmp_path / "out" / "model").iterdir()}
    assert "model.safetensors" in files and not any("adapter" in f for f in files)
    assert result.after.summary("forget")["mean_ma"] < result.before.summary("forget")["mean_ma"]


def _write_sets(tiny, folder):
    from tiny import sentences

    write_jsonl(folder / "general.jsonl", [Sequence(f"g{i}", t) for i, t in enumerate(sentences(10, seed=99))])
    (folder / "config.yaml").write_text("checkpoint-every: 2\nmax_steps: 8\nstop: steps\nlr: 0.0003\n"
                                        "max-utility-drop: 10\nel-n: 0\nprefix-tokens: 8\n")
    files = tiny["files"]
    return ["--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"], "--retain",
            files["retain"], "--general", folder / "general.jsonl", "--config", folder / "config.yaml",
            "--method", "gd", "--dtype", "float32"]


def test_a_killed_run_resumes_to_the_same_result(tiny, tmp_path):
    args = _write_sets(tiny, tmp_path)
    whole = run_cli("unlearn", *args, "--out", tmp_path / "whole")
    assert whole.returncode in (0, 3), whole.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "unmemorize", "unlearn", *map(str, args), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    checkpoint = tmp_path / "killed.partial" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not out.exists()  # never half-written: only the work folder exists

    resumed = run_cli("unlearn", *args, "--out", out, "--resume")
    assert resumed.returncode == whole.returncode, resumed.stderr
    assert folder_sha256(out / "model") == folder_sha256(tmp_path / "whole" / "model")
    same = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "whole" / "trajectory.jsonl").read_text().splitlines()]
    assert same == expected


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "nope"], "--method 'nope': unknown"),
    (["--stop", "never"], "--stop"),
    (["--lr", "-1"], "--lr"),
    (["--mask-fraction", "2"], "--mask-fraction"),
    (["--config", "{missing}"], "--config"),
    (["--config", "{bad_yaml}"], "bad YAML"),
    (["--config", "{unknown_key}"], "--flux"),
    (["--resume"], "--resume: no interrupted run"),
    (["--holdout", "{missing}"], "file not found"),
])
def test_bad_unlearn_input_exits_2_and_writes_nothing(tiny, tmp_path, extra, message):
    (tmp_path / "bad.yaml").write_text("lr: [unclosed\n")
    (tmp_path / "unknown.yaml").write_text("flux: 3\n")
    paths = {"missing": tmp_path / "missing.yaml", "bad_yaml": tmp_path / "bad.yaml",
             "unknown_key": tmp_path / "unknown.yaml"}
    files = tiny["files"]
    args = ["--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"]]
    result = run_cli("unlearn", *args, *[e.format(**paths) for e in extra], "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unlearn_refuses_an_existing_out_and_a_missing_holdout(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    files = tiny["files"]
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--out", tmp_path / "out")
    assert result.returncode == 2 and "already exists" in result.stderr
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", files["forget"], "--out", tmp_path / "new")
    assert result.returncode == 2 and "--holdout" in result.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.partial").exists()


def test_methods_lists_every_method_and_every_family_of_the_survey():
    result = run_cli("methods", env={"COLUMNS": "250"})
    assert result.returncode == 0
    for name in METHODS:
        assert name in result.stdout
    # every method in exactly one family; a family without a method of its own names the options that make it
    named = [name for names, _ in FAMILIES.values() for name in names]
    assert sorted(named) == sorted(METHODS)
    for family, (names, options) in FAMILIES.items():
        assert family in result.stdout and bool(names) != bool(options)
    unlearn_help = " ".join(run_cli("unlearn", "--help", env={"COLUMNS": "250"}).stdout.split())
    audit_help = " ".join(run_cli("audit", "--help", env={"COLUMNS": "250"}).stdout.split())
    for flag in ("--optimizer", "--localize", "--mask-fraction"):
        assert flag in unlearn_help
    for spec in ("icul", "guardrail", "input_filter", "dpd", "filter"):
        assert spec in audit_help


def test_same_seed_same_result(tiny, general, tmp_path):
    a = run(tiny, general, tmp_path / "a", method="sga", lr=3e-4, stop="steps", max_steps=3, max_utility_drop=10.0)
    b = run(tiny, general, tmp_path / "b", method="sga", lr=3e-4, stop="steps", max_steps=3, max_utility_drop=10.0)
    assert [r.ma for r in a.after.sequences] == [r.ma for r in b.after.sequences]
    assert torch.equal(*(load_model(p / "model", RUNTIME)[0].model.embed_tokens.weight for p in (tmp_path / "a",
                                                                                                   tmp_path / "b")))
