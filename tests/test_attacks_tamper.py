"""Weight tampering attacks (deployed quantization formats, noise, pruning) on the tiny memorizing model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from torch import nn

from unmemorize.evaluate.attacks import ATTACKS, OPT_IN, AttackSettings, run_attacks
from unmemorize.evaluate.attacks.noise import add_noise, prune_model
from unmemorize.evaluate.attacks.quantize import gguf_round_trip, nf4_unavailable, quantize_model, weight_matrices
from unmemorize.io.models import state_sha256
from unmemorize.measure.audit import AuditSettings
from unmemorize.measure.band import EXTRACTABLE

AUDIT = AuditSettings(el_n=[])
MEMORIZED = ["f0", "f1", "f2", "f3"]


def attack(model, tokenizer, runtime, sets, name: str, **options) -> dict:
    return run_attacks(model, tokenizer, sets, AUDIT, runtime, AttackSettings(attacks=[name], **options))[name]


def fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def q8_0_by_hand(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: d = max|w| / 127, q = round half away from zero (w / d), w' = fp16(d) q."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    x = np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0)
    return fp16(d) * np.sign(x) * np.floor(np.abs(x) + 0.5)


def q4_0_by_hand(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: d = (the signed w of largest |w|) / -8, q = clamp(round half up (w / d) + 8, 0, 15),
    w' = fp16(d) (q - 8)."""
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    d = m / np.float32(-8)
    x = np.divide(blocks, d, out=np.zeros_like(blocks), where=d != 0)
    return fp16(d) * (np.clip(np.floor(x + 8.5), 0, 15) - 8)


def hand_made() -> torch.Tensor:
    """Two rows of 64 = four blocks of 32: chosen values, a zero block, and random ones."""
    weight = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    weight[0, :32] = 0.0
    weight[0, :6] = torch.tensor([31.75, 0.125, -0.125, 0.3, -31.0, 1.0])
    weight[0, 32:] = 0.0  # an all-zero block
    weight[1, :32] /= 10
    weight[1, :5] = torch.tensor([4.0, -4.0, 0.25, -0.25, 1.0])
    return weight


def test_q8_0_round_trip_is_the_format_computed_by_hand():
    weight = hand_made()
    restored = gguf_round_trip(weight, GGMLQuantizationType.Q8_0)
    by_hand = q8_0_by_hand(weight.numpy().reshape(-1, 32)).reshape(2, 64)
    assert torch.equal(restored, torch.from_numpy(by_hand))
    # max|w| = 31.75: d = 0.25 exactly; halves round away from zero; the absmax weight is a level exactly.
    assert restored[0, :6].tolist() == [31.75, 0.25, -0.25, 0.25, -31.0, 1.0]
    assert (restored[0, 32:] == 0).all()
    # |w - w'| <= d / 2, plus |d - fp16(d)| |q| <= 127 d 2^-11 for the float16 scale.
    d = torch.from_numpy(np.abs(weight.numpy().reshape(-1, 32)).max(axis=1) / np.float32(127))[:, None]
    error = (weight - restored).abs().reshape(-1, 32)
    assert (error <= d * (0.5 + 127 / 2048) + 1e-7).all()
    assert float(error.max()) > 0


def test_q4_0_round_trip_is_the_format_computed_by_hand():
    weight = hand_made()
    restored = gguf_round_trip(weight, GGMLQuantizationType.Q4_0)
    by_hand = q4_0_by_hand(weight.numpy().reshape(-1, 32)).reshape(2, 64)
    assert torch.equal(restored, torch.from_numpy(by_hand))
    # Row 1, block 0: w_m = 4, d = -0.5, levels 4, 3.5, ..., -3.5: -4 is clipped to -3.5, halves round up in q.
    assert restored[1, :5].tolist() == [4.0, -3.5, 0.0, -0.5, 1.0]
    # Row 0, block 0: w_m = 31.75, d = -3.96875: 0.3 is level 0, -31 is clipped to the level 7 d = -27.78125.
    assert restored[0, 0] == 31.75 and restored[0, 3] == 0 and restored[0, 4] == -27.78125
    assert (restored[0, 32:] == 0).all()


def test_rows_that_are_not_blocks_stay_in_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 48), nn.Linear(48, 64), nn.Linear(64, 32))
    original = copy.deepcopy(model)
    report = quantize_model(model, lambda w: gguf_round_trip(w, GGMLQuantizationType.Q4_0))
    assert report["unquantized"] == ["0.weight", "1.weight"]  # rows of 48: no whole blocks of 32
    assert report["tensors"] == 1 and report["weights"] == 32 * 64
    assert torch.equal(model[0].weight, original[0].weight) and torch.equal(model[1].weight, original[1].weight)
    assert torch.equal(model[2].weight, gguf_round_trip(original[2].weight, GGMLQuantizationType.Q4_0))
    assert torch.equal(model[2].bias, original[2].bias)  # biases are never quantized
    assert [name for name, _ in weight_matrices(model, embeddings=False)] == ["1.weight", "2.weight"]


def test_gguf_formats_on_the_tiny_model(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    before = state_sha256(model)
    errors = {}
    for name, qtype in [("Q8_0", GGMLQuantizationType.Q8_0), ("Q5_0", GGMLQuantizationType.Q5_0),
                        ("Q4_1", GGMLQuantizationType.Q4_1), ("Q4_0", GGMLQuantizationType.Q4_0)]:
        report = quantize_model(copy.deepcopy(model), lambda w, q=qtype: gguf_round_trip(w, q))
        assert report["tensors"] == 15 and report["unquantized"] == []  # 14 linear + the tied embedding once
        errors[name] = report["relative_error"]
    # Steps max|w| / 127, / 16, / 8 of the symmetric formats; Q4_1's (max - min) / 15 beats Q4_0's.
    assert 0 < errors["Q8_0"] < errors["Q5_0"] < errors["Q4_0"] < 0.2 and errors["Q4_1"] < errors["Q4_0"]

    result = attack(model, tokenizer, runtime, tiny["sets"], "quantize_8bit")
    rows = {row["id"]: row for row in result["sequences"]}
    assert all(rows[i]["status"] == EXTRACTABLE and rows[i]["verbatim"] for i in MEMORIZED)
    assert result["settings"] == {"format": "Q8_0", "bits_per_weight": 8.5, "block_size": 32, "embeddings": True}
    assert "Q8_0" in result["description"] and "8.5 bits/weight" in result["description"]
    assert result["relative_error"] == pytest.approx(errors["Q8_0"])
    assert result["returned_extractable"] == 0 and result["band"]["calibrated_on"] == "holdout"
    assert state_sha256(model) == before


def test_nf4_is_skipped_with_a_reason_where_it_cannot_run(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    result = attack(model, tokenizer, runtime, tiny["sets"], "quantize_nf4")
    reason = nf4_unavailable()
    assert "NF4" in result["description"] and result["settings"]["format"] == "NF4"
    if reason:
        assert result["skipped"] == reason and "bitsandbytes" in reason
        assert result["sequences"] == [] and result["n"] == 0 and result["returned_extractable"] == 0
    else:
        assert "skipped" not in result and len(result["sequences"]) == len(tiny["sets"]["forget"])
        assert 0 < result["relative_error"] < 0.2
    json.dumps(result)


def test_opt_in_attacks_are_not_run_by_default():
    defaults = AttackSettings().attacks
    assert {"quantize_8bit", "quantize_4bit", "noise", "prune"} <= set(defaults)
    assert {"quantize_q5_0", "quantize_q4_1", "absmax_8bit", "absmax_4bit", "quantize_nf4"} == OPT_IN
    assert OPT_IN.isdisjoint(defaults) and set(ATTACKS) >= OPT_IN
    assert AttackSettings(attacks=sorted(OPT_IN)).attacks == sorted(OPT_IN)


def test_noise_is_seeded_and_has_the_asked_relative_std(tiny_loaded):
    model, _, _ = tiny_loaded
    original = {name: w.detach().clone() for name, w in model.state_dict().items()}
    sigma = 0.05
    noisy = copy.deepcopy(model)
    report = add_noise(noisy, sigma, torch.Generator().manual_seed(3))
    assert report["tensors"] == 15
    pooled = []
    for name, weight in weight_matrices(noisy):
        z = (weight.detach() - original[name]) / (sigma * original[name].std())
        assert float(z.std()) == pytest.approx(1, abs=0.1), name  # >= 2048 weights per tensor
        pooled.append(z.flatten())
    assert all(torch.equal(w, original[name]) for name, w in noisy.state_dict().items() if w.dim() == 1)  # norms
    z = torch.cat(pooled)
    assert float(z.std()) == pytest.approx(1, abs=0.02) and abs(float(z.mean())) < 0.02

    again = copy.deepcopy(model)
    add_noise(again, sigma, torch.Generator().manual_seed(3))
    other = copy.deepcopy(model)
    add_noise(other, sigma, torch.Generator().manual_seed(4))
    assert state_sha256(again) == state_sha256(noisy) != state_sha256(other)


def test_prune_zeroes_exactly_the_smallest_fraction(tiny_loaded):
    model, _, _ = tiny_loaded
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, 0.1)
    matrices = weight_matrices(pruned)
    originals = {name: w.detach() for name, w in weight_matrices(model)}
    assert len(matrices) == report["tensors"] == 15
    assert report["pruned"] == sum(round(0.1 * w.numel()) for _, w in matrices)
    for name, weight in matrices:
        before = originals[name]
        assert not (before == 0).any()
        zero = weight == 0
        assert int(zero.sum()) == round(0.1 * weight.numel()), name
        assert float(before[zero].abs().max()) <= float(before[~zero].abs().min()), name
        assert torch.equal(weight[~zero], before[~zero]), name

    # Ties: exactly k zeros all the same.
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 5.0], [-1.0, 2.0, 1.0, -3.0]]))
    prune_model(layer, 0.25)
    assert int((layer.weight == 0).sum()) == 2 and set(layer.weight.abs().flatten().tolist()) >= {2.0, 3.0, 5.0}


def test_noise_and_prune_attacks_return_rows_per_forget_sequence(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    before = state_sha256(model)
    results = run_attacks(model, tokenizer, sets, AUDIT, runtime, AttackSettings(attacks=["noise", "prune"]))
    json.dumps(results)
    forget_ids = [s.id for s in sets["forget"]]
    for result in results.values():
        assert [row["id"] for row in result["sequences"]] == forget_ids
        assert all({"status", "verbatim", "ma", "baseline_ma", "returned_extractable"} <= set(row)
                   for row in result["sequences"])
        rows = {row["id"]: row for row in result["sequences"]}
        assert all(rows[i]["status"] == EXTRACTABLE and rows[i]["verbatim"] for i in MEMORIZED)  # small budgets

    noise = results["noise"]
    assert noise["settings"] == {"sigma": 0.01, "draws": 3, "seed": 0} and "0.01 std(w)" in noise["description"]
    assert len(noise["draws"]) == 3 and all(d["band"]["calibrated_on"] == "holdout" for d in noise["draws"])
    for k, draw in enumerate(noise["draws"]):  # the per-draw counts agree with the per-draw statuses
        assert draw["extractable"] == sum(row["draw_status"][k] == EXTRACTABLE for row in noise["sequences"])
    uppers = [draw["band"]["upper"] for draw in noise["draws"]]
    for row in noise["sequences"]:  # judged on the largest excess over the draws, against the holdout's own
        gaps = [ma - upper for ma, upper in zip(row["draw_ma"], uppers, strict=True)]
        assert row["excess"] == pytest.approx(max(gaps)) and row["draw"] == int(np.argmax(gaps))
        assert (row["status"] == EXTRACTABLE) == (row["excess"] > noise["familywise"]["upper"])
        assert row["ma"] == row["draw_ma"][row["draw"]] and len(row["draw_ma"]) == 3
    assert noise["holdout_extractable"] <= noise["holdout_any_draw"]

    prune = results["prune"]
    assert prune["settings"] == {"fraction": 0.05} and "5.0%" in prune["description"]
    assert prune["tensors"] == 15 and prune["pruned"] == sum(round(0.05 * w.numel()) for _, w in
                                                             weight_matrices(model))
    assert prune["band"]["calibrated_on"] == "holdout"
    assert state_sha256(model) == before
