"""Robustness attacks on the tiny model that memorized f0-f3 (repeated 8x); h* were never seen."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from unmemorize.errors import InputError
from unmemorize.evaluate.attacks import ATTACKS, DEFAULT_ATTACKS, OPT_IN, AttackSettings, against_oracle, run_attacks
from unmemorize.evaluate.attacks.prefix import Split
from unmemorize.evaluate.attacks.quantize import absmax_round_trip, quantize_model
from unmemorize.evaluate.attacks.sampling import lcs_length, rouge_l
from unmemorize.io.models import state_sha256
from unmemorize.io.tokens import encode, pad
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.band import EXTRACTABLE
from unmemorize.measure.scoring import score_tokens, token_logprobs

AUDIT = AuditSettings(el_n=[])
MEMORIZED = ["f0", "f1", "f2", "f3"]


def attack(model, tokenizer, runtime, sets, name: str, **options) -> dict:
    return run_attacks(model, tokenizer, sets, AUDIT, runtime, AttackSettings(attacks=[name], **options))[name]


def by_id(result: dict) -> dict[str, dict]:
    return {row["id"]: row for row in result["sequences"]}


def lcs_table(a: list[int], b: list[int]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_bit_parallel_equals_the_table():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(5) for _ in range(rng.randint(1, 40))]
        b = [rng.randrange(5) for _ in range(rng.randint(1, 40))]
        assert lcs_length(a, b) == lcs_table(a, b)
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l([4, 5], [1, 2, 3]) == 0.0
    assert rouge_l([1, 9, 3, 9], [1, 2, 3]) == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))


def test_sampling_extracts_what_was_memorized(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    result = attack(model, tokenizer, runtime, tiny["sets"], "sampling", temperature=0.3)
    rows = by_id(result)
    assert all(rows[i]["extracted"] and rows[i]["status"] == EXTRACTABLE and rows[i]["verbatim"] for i in MEMORIZED)
    assert all(rows[i]["best_rouge_l"] == 1.0 for i in MEMORIZED)
    assert result["holdout_n"] == 20 and result["holdout_extracted"] == 0  # unseen text: never extracted

    # top_k = 1 is greedy decoding: extracted exactly when the audit calls the sequence verbatim.
    greedy = by_id(attack(model, tokenizer, runtime, tiny["sets"], "sampling", top_k=1, samples=2))
    baseline = audit(model, tokenizer, tiny["sets"], AUDIT, runtime)
    assert {r.id for r in baseline.of("forget") if r.verbatim} == {i for i, row in greedy.items() if row["extracted"]}

    # The same seed draws the same samples.
    again = attack(model, tokenizer, runtime, tiny["sets"], "sampling", temperature=0.3)
    assert again["sequences"] == result["sequences"]


def test_sampling_extracts_nothing_from_a_model_that_never_saw_the_set(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    torch.manual_seed(1)
    untrained = LlamaForCausalLM(model.config).eval()
    result = attack(untrained, tokenizer, runtime, tiny["sets"], "sampling", temperature=0.3)
    assert result["forget_extracted"] == 0 and result["holdout_extracted"] == 0
    assert all(row["best_rouge_l"] < 1 for row in result["sequences"])


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, 64), (4, 7)])
def test_absmax_round_trip_error_is_at_most_half_a_step(bits, group):
    weight = torch.randn(5, 150, generator=torch.Generator().manual_seed(0))
    weight[2] = 0  # an all-zero row stays zero
    quantized, scale = absmax_round_trip(weight, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert quantized.shape == weight.shape == scale.shape
    assert ((weight - quantized).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert (quantized[2] == 0).all()
    levels = quantized / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= qmax + 1e-4
    # The largest weight of each group is a level exactly (absmax maps to +-qmax).
    step = 150 if group is None else group
    for start in range(0, 150, step):
        block = weight[0, start : start + step]
        k = int(block.abs().argmax())
        assert quantized[0, start + k] == pytest.approx(float(block[k]), rel=1e-6)


def test_absmax_quantized_model_stays_within_bound_and_8bit_keeps_memorized(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    before = state_sha256(model)
    original = {name: w.detach().clone() for name, w in model.state_dict().items()}
    copied = copy.deepcopy(model)
    report = quantize_model(copied, lambda w: absmax_round_trip(w, 4, 64)[0])
    assert report["unquantized"] == [] and report["max_abs_error"] > 0 and 0 < report["relative_error"] < 0.2
    assert report["tensors"] == 15  # 14 linear layers + the embedding tied to the output head, once
    for name, weight in copied.state_dict().items():
        if weight.dim() == 2:
            _, scale = absmax_round_trip(original[name], 4, 64)
            assert ((weight - original[name]).abs() <= scale / 2 * (1 + 1e-5) + 1e-12).all(), name
        else:  # norms are not quantized
            assert torch.equal(weight, original[name]), name

    result = attack(model, tokenizer, runtime, tiny["sets"], "absmax_8bit")
    rows = by_id(result)
    assert all(rows[i]["status"] == EXTRACTABLE and rows[i]["verbatim"] for i in MEMORIZED)
    assert result["settings"]["bits"] == 8 and result["settings"]["group_size"] is None
    assert result["tensors"] == 15 and result["max_abs_error"] > 0
    assert state_sha256(model) == before


def _forgotten(model, tokenizer, runtime, sets):
    """A copy after 5 steps of gradient ascent on the forget set: f0-f3 no longer verbatim."""
    forgotten = copy.deepcopy(model).train()
    input_ids, mask = pad(encode(tokenizer, sets["forget"], 256), 0)
    optimizer = torch.optim.Adam(forgotten.parameters(), lr=1e-3)
    for _ in range(5):
        loss = (token_logprobs(forgotten, input_ids, mask, runtime) * mask[:, 1:]).sum() / mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return forgotten.eval()


def test_relearn_brings_back_what_ascent_only_hid(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    forgotten = _forgotten(model, tokenizer, runtime, sets)
    baseline = audit(forgotten, tokenizer, sets, AUDIT, runtime)
    assert not any(r.verbatim for r in baseline.of("forget"))
    before = state_sha256(forgotten)

    result = attack(forgotten, tokenizer, runtime, sets, "relearn", relearn_lr=3e-4)
    forget_ids = [s.id for s in sets["forget"]]
    assert set(result["trained_ids"]).isdisjoint(result["audited_ids"])
    assert sorted(result["trained_ids"] + result["audited_ids"]) == sorted(forget_ids)
    assert [row["id"] for row in result["sequences"]] == result["audited_ids"]
    assert result["steps"] == 10 and len(result["losses"]) == 10
    assert result["band"]["calibrated_on"] == "holdout"
    # Training on one half raises the memorization of the other half.
    assert np.mean([r["ma"] for r in result["sequences"]]) > np.mean([r["baseline_ma"] for r in result["sequences"]])
    assert result["returned_verbatim"] >= 1
    assert state_sha256(forgotten) == before

    # benign_relearn, on text that is not the request (the retain set by default): every forget sequence is
    # audited, and hidden ones come back verbatim.
    on_retain = attack(forgotten, tokenizer, runtime, sets, "benign_relearn", relearn_lr=3e-4)
    assert on_retain["trained_on"] == "retain" and on_retain["trained_n"] == len(sets["retain"])
    assert on_retain["trained_ids"] == [] and on_retain["audited_ids"] == forget_ids
    assert on_retain["returned_verbatim"] >= 1
    assert state_sha256(forgotten) == before
    # The step budget is exact, also when it ends inside an epoch (12 retain sequences, 2 per step: 6 per epoch).
    partial = attack(forgotten, tokenizer, runtime, sets, "benign_relearn", relearn_steps=3, relearn_batch=2)
    assert partial["steps"] == 3 and len(partial["losses"]) == 3
    # Without a retain set it trains on the general text; with neither it is an input error.
    no_retain = {k: v for k, v in sets.items() if k != "retain"}
    on_general = attack(forgotten, tokenizer, runtime, {**no_retain, "general": sets["retain"][:4]}, "benign_relearn",
                        relearn_steps=1)
    assert on_general["trained_on"] == "general" and on_general["trained_n"] == 4 and on_general["steps"] == 1
    with pytest.raises(InputError, match="needs a general set"):
        attack(forgotten, tokenizer, runtime, no_retain, "benign_relearn")


def test_prefix_variations(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    result = attack(model, tokenizer, runtime, sets, "prefix")
    assert set(result["variations"]) == set(AttackSettings().prefix_variations)
    rows = by_id(result)
    assert all(rows[i]["variations"]["long"]["verbatim"] for i in MEMORIZED)
    assert all(rows[i]["status"] == EXTRACTABLE for i in MEMORIZED)

    # The band of each variation is calibrated on the holdout's suffix MA under that variation.
    holdout = encode(tokenizer, sets["holdout"], AUDIT.max_tokens)
    scores = score_tokens(model, holdout, runtime)
    cuts = {"short": lambda p, t: max(p // 2, 1), "long": lambda p, t: p + (t - p) // 2,
            "lowercase": lambda p, t: p}  # words here are already lowercase: the prompt is the original one
    for name, cut in cuts.items():
        suffix_ma = []
        for ids, score in zip(holdout, scores, strict=True):
            p = min(AUDIT.prefix_tokens, len(ids) // 2)
            suffix_ma.append(score.hits[cut(p, len(ids)) - 1 :].mean())
        band = result["variations"][name]["band"]
        assert band["upper"] == pytest.approx(float(np.quantile(suffix_ma, 0.95)))
        assert band["lower"] == pytest.approx(float(np.quantile(suffix_ma, 0.05)))
        assert result["variations"][name]["holdout_mean_ma"] == pytest.approx(float(np.mean(suffix_ma)))

    # The prompt text ends where token P ends, and tokenizes back to the same P tokens.
    split = Split(tokenizer, sets["forget"][0].text, AUDIT.max_tokens)
    p = len(split.ids) // 2
    assert tokenizer(split.prompt_text(p))["input_ids"] == split.ids[:p]
    # Priming puts a whole record before the prompt.
    assert all(row["variations"]["prime_forget"]["prompt_tokens"] > row["variations"]["lowercase"]["prompt_tokens"]
               for row in result["sequences"])

    # A sequence is judged on its largest excess over the variations' upper edges, against the band of the
    # holdout's own largest excesses: unseen text is above that as rarely as above one band.
    uppers = {name: v["band"]["upper"] for name, v in result["variations"].items()}
    for row in result["sequences"]:
        gaps = {name: r["ma"] - uppers[name] for name, r in row["variations"].items()}
        assert row["excess"] == pytest.approx(max(gaps.values())) and row["variation"] == max(gaps, key=gaps.get)
        assert (row["status"] == EXTRACTABLE) == (row["excess"] > result["familywise"]["upper"])
    assert result["holdout_extractable"] <= 0.1 <= result["holdout_any_variation"]

    without_retain = attack(model, tokenizer, runtime, {k: sets[k] for k in ("forget", "holdout")}, "prefix")
    assert without_retain["settings"]["skipped"] == ["prime_retain"]
    with pytest.raises(InputError, match="none of the variations prime_retain can run"):
        attack(model, tokenizer, runtime, {k: sets[k] for k in ("forget", "holdout")}, "prefix",
               prefix_variations=["prime_retain"])


def test_run_attacks_is_json_without_text_and_leaves_the_model_alone(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    before = state_sha256(model)
    measured = []

    def wrap(m):
        measured.append(m)
        return m

    results = run_attacks(model, tokenizer, sets, AUDIT, runtime, AttackSettings(), wrap=wrap)
    assert list(results) == DEFAULT_ATTACKS and set(DEFAULT_ATTACKS) == set(ATTACKS) - OPT_IN
    dumped = json.dumps(results)
    for entry in results.values():
        assert isinstance(entry["returned_extractable"], int) and isinstance(entry["returned_verbatim"], int)
        assert entry["description"] and entry["settings"]
        assert all({"id", "hash", "status", "verbatim"} <= set(row) for row in entry["sequences"])
    for seq in (s for group in sets.values() for s in group):
        assert seq.text not in dumped
    assert "k0 v" not in dumped  # not even a fragment of a record
    assert state_sha256(model) == before
    # The input model and distinct copies were measured: relearn, benign_relearn, the two quantizations, the 3
    # noise draws and prune (the white-box attacks read the weights themselves).
    assert any(m is model for m in measured)
    assert len({id(m) for m in measured if m is not model}) == 8


def test_bad_names_are_input_errors():
    with pytest.raises(InputError, match="unknown attack"):
        AttackSettings(attacks=["sampling", "jailbreak"])
    with pytest.raises(InputError, match="unknown"):
        AttackSettings(prefix_variations=["uppercase"])
    assert AttackSettings(attacks=["prefix", "prefix"]).attacks == ["prefix"]


def test_against_oracle_counts_only_what_the_oracle_does_not_show():
    def row(id_, status, verbatim, returned_e, returned_v):
        return {"id": id_, "status": status, "verbatim": verbatim, "returned_extractable": returned_e,
                "returned_verbatim": returned_v}

    mine = {"prefix": {"returned_extractable": 3, "returned_verbatim": 1, "sequences": [
                row("a", EXTRACTABLE, False, True, False),   # the oracle shows it too: not beyond
                row("b", EXTRACTABLE, True, True, True),     # the oracle: extractable, not verbatim
                row("c", EXTRACTABLE, False, True, False),   # the oracle's attack did not measure it
                row("d", "in_band", False, False, False)]},
            "noise": {"returned_extractable": 0, "returned_verbatim": 0, "sequences": []}}
    theirs = {"prefix": {"returned_extractable": 2, "returned_verbatim": 0, "extractable": 2, "verbatim": 0,
                         "n": 3, "sequences": [row("a", EXTRACTABLE, False, True, False),
                                               row("b", EXTRACTABLE, False, True, False),
                                               row("d", "in_band", True, False, True)]}}
    against_oracle(mine, theirs)
    prefix = mine["prefix"]
    assert prefix["beyond_oracle_extractable"] == 1 and prefix["beyond_oracle_verbatim"] == 1  # c; b's verbatim
    assert [r["beyond_oracle_extractable"] for r in prefix["sequences"]] == [False, False, True, False]
    assert [r["beyond_oracle_verbatim"] for r in prefix["sequences"]] == [False, True, False, False]
    assert [r["oracle_status"] for r in prefix["sequences"]] == [EXTRACTABLE, EXTRACTABLE, None, "in_band"]
    assert prefix["oracle"] == {"returned_extractable": 2, "returned_verbatim": 0, "extractable": 2, "verbatim": 0,
                                "n": 3}
    assert "oracle" not in mine["noise"] and "beyond_oracle_extractable" not in mine["noise"]  # not run there
