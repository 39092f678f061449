"""The adversarial_prefix (GCG) attack on the tiny model that memorized f0-f3 (repeated 8x), after a few steps of
gradient ascent hid them; h* were never seen."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unmemorize.errors import InputError
from unmemorize.evaluate.attacks import AttackSettings, run_attacks
from unmemorize.evaluate.attacks.gcg import make_target
from unmemorize.evaluate.decoding import PrivateDecoding
from unmemorize.io.models import state_sha256
from unmemorize.io.tokens import encode, pad, set_context_length
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.band import EXTRACTABLE, calibrate
from unmemorize.measure.extraction import greedy_continue
from unmemorize.measure.scoring import score_tokens, token_logprobs

AUDIT = AuditSettings(el_n=[])
BUDGET = {"gcg_steps": 10, "gcg_candidates": 16, "holdout_control": 10}


def gcg(model, tokenizer, runtime, sets, **options) -> dict:
    settings = AttackSettings(attacks=["adversarial_prefix"], **{**BUDGET, **options})
    return run_attacks(model, tokenizer, sets, AUDIT, runtime, settings)["adversarial_prefix"]


@pytest.fixture(scope="module")
def hidden(tiny_loaded, tiny):
    """A copy after 4 steps of gradient ascent on the forget set: f0-f3 no longer verbatim."""
    model, tokenizer, runtime = tiny_loaded
    hidden = copy.deepcopy(model).train()
    input_ids, mask = pad(encode(tokenizer, tiny["sets"]["forget"], 256), 0)
    optimizer = torch.optim.Adam(hidden.parameters(), lr=1e-3)
    for _ in range(4):
        loss = (token_logprobs(hidden, input_ids, mask, runtime) * mask[:, 1:]).sum() / mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return hidden.eval()


@pytest.fixture(scope="module")
def attacked(hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    hidden.requires_grad_(False)
    hidden.lm_head.requires_grad_(True)  # a mix of flags, which the attack must leave as it found them
    before = state_sha256(hidden)
    flags = [p.requires_grad for p in hidden.parameters()]
    result = gcg(hidden, tokenizer, runtime, tiny["sets"])
    assert [p.requires_grad for p in hidden.parameters()] == flags
    assert all(p.grad is None for p in hidden.parameters())
    assert state_sha256(hidden) == before
    return result


def test_search_never_raises_the_loss_and_measures_the_suffix_as_stated(attacked, hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    rows = attacked["sequences"] + attacked["control"]
    assert all(r["loss_after"] <= r["loss_before"] for r in rows)
    assert any(r["loss_after"] < r["loss_before"] for r in attacked["sequences"])
    assert all(len(r["losses"]) == 10 and r["losses"][-1] == r["loss_after"] for r in rows)
    assert all(len(r["prefix_ids"]) == 6 and all(isinstance(t, int) for t in r["prefix_ids"]) for r in rows)

    # Measured again from the prefixes found, with the audit's scorer and real greedy decoding: the tiny
    # tokenizer puts no BOS first, so the input is A + x_1..x_P + x_{P+1}..x_T.
    holdout = {s.id: s for s in sets["holdout"]}
    ids = encode(tokenizer, sets["forget"] + [holdout[r["id"]] for r in attacked["control"]], AUDIT.max_tokens)
    cuts = [min(AUDIT.prefix_tokens, len(x) // 2) for x in ids]
    prompts = [r["prefix_ids"] + x[:p] for r, x, p in zip(rows, ids, cuts, strict=True)]
    scores = score_tokens(hidden, [q + x[p:] for q, x, p in zip(prompts, ids, cuts, strict=True)], runtime)
    greedy = greedy_continue(hidden, prompts, [len(x) - p for x, p in zip(ids, cuts, strict=True)], runtime, 8, 0)
    for row, x, p, prompt, score, decoded in zip(rows, ids, cuts, prompts, scores, greedy, strict=True):
        hits = score.hits[len(prompt) - 1 :]  # hits[i] scores token i + 2 (1-based): the suffix tokens
        assert (row["prefix_tokens"], row["suffix_tokens"]) == (p, len(x) - p) == (p, len(hits))
        assert row["ma"] == pytest.approx(hits.mean())
        assert row["loss_after"] == pytest.approx(-score.logprobs[len(prompt) - 1 :].mean(), abs=1e-4)
        assert row["verbatim"] == bool(hits.all()) == (decoded == x[p:])


def test_band_is_the_attacked_holdouts_and_counts_follow_the_rows(attacked, hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    chosen = sorted(np.random.default_rng(0).permutation(len(sets["holdout"]))[:10].tolist())
    assert [r["id"] for r in attacked["control"]] == [sets["holdout"][i].id for i in chosen]
    band = calibrate(AUDIT.band, [r["ma"] for r in attacked["control"]])
    assert attacked["band"] == band.to_json() and band.n == attacked["holdout_n"] == 10
    assert attacked["holdout_mean_ma"] > attacked["holdout_mean_ma_before"]  # the prefix lifts unseen text too

    baseline = {r.id: r for r in audit(hidden, tokenizer, sets, AUDIT, runtime).of("forget")}
    before = calibrate(AUDIT.band, [r["ma_before"] for r in attacked["control"]])
    assert attacked["band_before"] == before.to_json()
    for row in attacked["sequences"]:
        assert row["status"] == band.status(row["ma"]) and row["status_before"] == before.status(row["ma_before"])
        assert (row["baseline_status"], row["baseline_verbatim"]) == (baseline[row["id"]].status,
                                                                      baseline[row["id"]].verbatim)
        # returned: by the search (not already so under the initial prefix) and not in the baseline audit
        assert row["returned_extractable"] == (row["status"] == EXTRACTABLE and row["baseline_status"] != EXTRACTABLE
                                               and row["status_before"] != EXTRACTABLE)
        assert row["returned_verbatim"] == (row["verbatim"] and not row["baseline_verbatim"]
                                            and row["ma_before"] < 1)
    for key in ("returned_extractable", "returned_verbatim", "verbatim"):
        assert attacked[key] == sum(row[key] for row in attacked["sequences"])
    # Ascent hid f0-f3 from greedy decoding; a few prefix tokens bring most of them back, and no unseen text.
    assert not any(baseline[i].verbatim for i in ("f0", "f1", "f2", "f3"))
    assert attacked["returned_verbatim"] >= 2 and attacked["holdout_verbatim"] == 0
    assert attacked["settings"] == {"tokens": 6, "steps": 10, "candidates": 16, "top_k": 32, "seed": 0,
                                    "holdout_control": 10, "prefix_tokens": 32, "band": AUDIT.band}


def test_seeded_runs_are_identical(attacked, hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    strip = lambda result: {k: v for k, v in result.items() if k != "seconds"}  # noqa: E731
    assert strip(gcg(hidden, tokenizer, runtime, tiny["sets"])) == strip(attacked)
    other = gcg(hidden, tokenizer, runtime, tiny["sets"], seed=1)
    assert [r["prefix_ids"] for r in other["sequences"]] != [r["prefix_ids"] for r in attacked["sequences"]]


def test_prefix_goes_after_a_bos_and_the_prompt_gives_way_to_the_context():
    tokenizer = SimpleNamespace(bos_token_id=5)
    target = make_target([5, 10, 11, 12, 13, 14], tokenizer, 32, 3)
    assert target.ids([1, 1, 1]) == [5, 1, 1, 1, 10, 11, 12, 13, 14]
    set_context_length(tokenizer, 8)  # 6 tokens + 3 of prefix: the prompt's first token gives way
    assert make_target([5, 10, 11, 12, 13, 14], tokenizer, 32, 3).ids([1, 1, 1]) == [5, 1, 1, 1, 11, 12, 13, 14]


def test_the_band_needs_a_holdout_control(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    with pytest.raises(InputError, match="holdout-control"):
        gcg(model, tokenizer, runtime, tiny["sets"], holdout_control=0)


def test_a_swap_is_kept_only_when_it_lowers_the_loss(hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    # One random swap a step among all tokens: many would raise the loss, and none of those may be kept.
    result = gcg(hidden, tokenizer, runtime, tiny["sets"], gcg_candidates=1, gcg_top_k=100)
    trajectories = [[r["loss_before"], *r["losses"]] for r in result["sequences"] + result["control"]]
    assert all(np.all(np.diff(t) <= 0) for t in trajectories)
    assert any(np.any(np.diff(t) < 0) for t in trajectories) and any(np.any(np.diff(t) == 0) for t in trajectories)


def test_json_without_text_and_every_measure_is_of_the_measured_model(attacked, hidden, tiny_loaded, tiny):
    _, tokenizer, runtime = tiny_loaded
    sets = tiny["sets"]
    dumped = json.dumps(attacked)
    assert all(seq.text not in dumped for group in sets.values() for seq in group) and "k0 v" not in dumped

    # Under a decoding guard the losses are the guarded model's (steps 0: the initial prefix only).
    guard = lambda m: PrivateDecoding(m, 0.5)  # noqa: E731
    settings = AttackSettings(attacks=["adversarial_prefix"], gcg_steps=0, holdout_control=10)
    result = run_attacks(hidden, tokenizer, sets, AUDIT, runtime, settings, wrap=guard)["adversarial_prefix"]
    ids = encode(tokenizer, sets["forget"], AUDIT.max_tokens)
    for row, x in zip(result["sequences"], ids, strict=True):
        p = min(AUDIT.prefix_tokens, len(x) // 2)
        score = score_tokens(guard(hidden), [row["prefix_ids"] + x], runtime)[0]
        assert row["loss_after"] == row["loss_before"] == pytest.approx(-score.logprobs[-(len(x) - p) :].mean())
