"""Quantization-aware unlearning (`--harden FORMAT`: the Q4_0 attack run inside the loop) on the tiny memorizing
model: the weight swap is exact, one step's gradient against a hand computation (the forget gradient at w plus,
for the sequences that come back quantized, the forget gradient at Q(w)), a run whose result the quantization
attack cannot bring back, and bad values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from clirun import run_cli
from conftest import read_json
from recorder import Recorder
from test_sam import (
    FAST,
    FAST_AUDIT,
    ONE_THREAD,
    RUNTIME,
    distance,
    gradient,
    mean_logprob,
    rows,
)

from unmemorize.io.models import load_model
from unmemorize.io.quantize import GGUF_FORMATS, gguf_round_trip, round_trip_weights, weights_swapped
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.target import Target


def quantized_copy(model):
    """A copy of `model` with every weight matrix (the tied embedding once) round-tripped through Q4_0, by hand."""
    copied = copy.deepcopy(model)
    seen = set()
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                module.weight.copy_(gguf_round_trip(module.weight, GGUF_FORMATS["Q4_0"]))
    return copied


def test_weights_swapped_holds_the_round_trip_inside_and_restores_bit_for_bit(tiny_loaded):
    model, _, _ = tiny_loaded
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    pairs = round_trip_weights(model, "Q4_0")
    expected = quantized_copy(model)
    assert len(pairs) == 1 + 2 * 7  # the tied embedding, and 7 linear layers in each of the 2 blocks
    with weights_swapped(pairs):
        inside = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(inside, expected.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(inside, before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_one_hardened_step_adds_the_forget_gradient_at_the_quantized_weights(tiny, general, tmp_path, monkeypatch):
    """gd, one step: grad = d ascent(w; all forget) + d NLL(w; retain) + d ascent(Q(w); hardened), the last taken at
    the Q4_0 round trip of w and applied to w."""
    found = []
    check = Target.check_quantized

    def record(target):
        check(target)
        found.append(list(target.hardened))

    monkeypatch.setattr(Target, "check_quantized", record)
    recorder = Recorder(monkeypatch)
    settings = UnlearnSettings(method="gd", lr=1e-3, stop="steps", max_steps=1, max_utility_drop=10.0, target="ma",
                               harden="Q4_0", audit=FAST_AUDIT)
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    try:
        unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "out")
    finally:
        recorder.close()
    hardened = found[0]
    assert hardened  # at step 0 the request is memorized: it comes back quantized too
    (forget, retain), (again, _) = recorder.calls
    assert again.indices == hardened
    model, _ = load_model(tiny["model"], RUNTIME)
    quantized = quantized_copy(model)
    plain = [f - r for f, r in zip(gradient(model, mean_logprob(model, rows(forget))),
                                   gradient(model, mean_logprob(model, rows(retain))), strict=True)]
    expected = [p + q for p, q in zip(plain, gradient(quantized, mean_logprob(quantized, rows(again))), strict=True)]
    weights, grads = recorder.steps[0]["weights"], recorder.steps[0]["grads"]
    assert distance(grads, expected) < 1e-4
    at_w = [p + w for p, w in zip(plain, gradient(model, mean_logprob(model, rows(again))), strict=True)]
    assert distance(plain, expected) > 0.05  # the quantized term is there
    assert distance(at_w, expected) > 1e-2  # and taken at Q(w), not at w
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))  # the step starts at w


def test_a_hardened_run_leaves_nothing_the_4bit_attack_brings_back(tiny, tmp_path):
    files = tiny["files"]
    sets = ["--forget", files["forget"], "--holdout", files["holdout"], "--retain", files["retain"]]
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], *sets, "--general", files["retain"], "--harden", "Q4_0",
                     "--localize", "none", "--lr", "1e-3", "--max-steps", "60", "--max-utility-drop", "10",
                     "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    run = read_json(out / "run.json")
    assert run["settings"]["harden"] == "Q4_0" and run["target_reached"]
    assert run["forget"]["extractable_after"] == 0 < run["forget"]["extractable_before"]
    lines = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    hardened = [line for line in lines if line.get("hardened")]
    assert hardened and all(line["harden_loss"] > 0 for line in hardened)  # the quantized term was trained on
    attacked = run_cli("attack", "--model", out / "model", *sets, "--attacks", "quantize_4bit", "--prefix-tokens",
                       "8", "--dtype", "float32", "--out", tmp_path / "attack", env=ONE_THREAD)
    assert attacked.returncode == 0, attacked.stderr
    q4 = read_json(tmp_path / "attack" / "attack.json")["quantize_4bit"]
    assert q4["settings"]["format"] == "Q4_0" and q4["returned_extractable"] == 0 and q4["returned_verbatim"] == 0


@pytest.mark.parametrize("extra", [["--harden", "Q3_K"], ["--harden", "Q4_0", "--lora", "4"]])
def test_bad_harden_exits_2_with_one_line(tiny, tmp_path, extra):
    files = tiny["files"]
    out = tmp_path / "out"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     *extra, "--out", out, *FAST, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "harden" in lines[0], lines
    assert not out.exists()
