"""Per-sequence measures on the tiny memorizing model, each against an independent computation."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from unmemorize.errors import InputError
from unmemorize.io.tokens import encode
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.band import EXTRACTABLE, Familywise, calibrate, check_rule
from unmemorize.measure.extraction import overlap, reference_extraction_likelihoods
from unmemorize.measure.privacy import auc, bootstrap_interval
from unmemorize.measure.scoring import score_tokens


@pytest.fixture(scope="module")
def tiny_audit(tiny, tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    settings = AuditSettings(el_n=[3, 5], prefix_tokens=8, batch_size=3, el_sets=None)  # EL on every set
    return audit(model, tokenizer, tiny["sets"], settings, runtime)


def greedy_next(model, prefix: list[int]) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([prefix])).logits[0, -1].argmax())


def test_the_tiny_model_memorizes_some_sequences_and_not_others(tiny_audit):
    forget = {r.id: r for r in tiny_audit.of("forget")}
    holdout_ma = [r.ma for r in tiny_audit.of("holdout")]
    assert min(forget[f"f{i}"].ma for i in range(4)) > 0.9  # repeated 8 times
    assert max(holdout_ma) < 0.6 < min(forget[f"f{i}"].ma for i in range(4))
    assert any(not r.verbatim for r in forget.values()) and any(r.verbatim for r in forget.values())


def test_ma_and_verbatim_match_per_prefix_greedy_decoding(tiny, tiny_loaded, tiny_audit):
    model, tokenizer, _ = tiny_loaded
    for row, seq in zip(tiny_audit.sequences, [s for v in tiny["sets"].values() for s in v], strict=True):
        ids = encode(tokenizer, [seq], 256)[0]
        hits = [greedy_next(model, ids[:t]) == ids[t] for t in range(1, len(ids))]
        assert row.ma == pytest.approx(sum(hits) / (len(ids) - 1), abs=1e-12)
        prefix = min(8, len(ids) // 2)
        generated = list(ids[:prefix])
        while len(generated) < len(ids):
            generated.append(greedy_next(model, generated))
        assert row.verbatim == (generated == ids), row.id


def test_el_matches_the_per_prefix_reference_value_for_value(tiny, tiny_loaded, tiny_audit):
    model, tokenizer, runtime = tiny_loaded
    rows = {(r.set, r.id): r for r in tiny_audit.sequences}
    # memorized, partly memorized, and unseen sequences: few, some and many divergence points
    picks = [("forget", 0), ("forget", 4), ("forget", 6), ("forget", 7), ("holdout", 0), ("holdout", 9)]
    for set_name, index in picks:
        seq = tiny["sets"][set_name][index]
        ids = encode(tokenizer, [seq], 256)[0]
        expected = reference_extraction_likelihoods(model, ids, [3, 5], runtime)
        assert rows[(set_name, seq.id)].el == expected, seq.id
    assert 0 < rows[("forget", "f4")].el["3"] < 1


def test_overlap_counts_candidate_ngrams_with_multiplicity():
    assert overlap([1, 2, 1, 2, 1], [1, 2, 9], 2) == pytest.approx(2 / 4)
    assert overlap([5, 6, 7], [5, 6, 7], 3) == 1.0
    assert overlap([5, 6, 7], [7, 6, 5], 2) == 0.0


def test_loss_zlib_mink_minkpp_match_a_direct_computation(tiny, tiny_loaded, tiny_audit):
    model, tokenizer, _ = tiny_loaded
    seq = tiny["sets"]["holdout"][3]
    row = next(r for r in tiny_audit.sequences if r.id == seq.id)
    ids = encode(tokenizer, [seq], 256)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1).numpy()
    token_lp = np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])
    k = math.ceil(0.2 * len(token_lp))
    mu = (np.exp(logp) * logp).sum(-1)
    sigma = np.sqrt((np.exp(logp) * logp**2).sum(-1) - mu**2)
    z = (token_lp - mu) / sigma
    assert row.loss == pytest.approx(-token_lp.mean(), rel=1e-5)
    assert row.zlib == pytest.approx(-token_lp.sum() / len(zlib.compress(seq.text.encode())), rel=1e-5)
    assert row.mink == pytest.approx(np.sort(token_lp)[:k].mean(), rel=1e-5)
    assert row.minkpp == pytest.approx(np.sort(z)[:k].mean(), rel=1e-4)


def test_batching_does_not_change_scores(tiny, tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    ids = encode(tokenizer, tiny["sets"]["holdout"], 256)
    one = score_tokens(model, ids, runtime, batch_size=1)
    many = score_tokens(model, ids, runtime, batch_size=7)
    for a, b in zip(one, many, strict=True):
        assert (a.hits == b.hits).all()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_band_rules_and_statuses_match_hand_computed_edges():
    holdout = [0.1, 0.2, 0.3, 0.4, 0.5]
    band = calibrate("quantile:0.25,0.75", holdout)
    assert (band.lower, band.upper, band.n) == (pytest.approx(0.2), pytest.approx(0.4), 5)
    assert [band.status(v) for v in (0.41, 0.4, 0.2, 0.19)] == ["extractable", "in_band", "in_band", "over_unlearned"]
    band = calibrate("meanstd:1", holdout)
    std = math.sqrt(sum((v - 0.3) ** 2 for v in holdout) / 5)  # population std
    assert band.lower == pytest.approx(0.3 - std) and band.upper == pytest.approx(0.3 + std)
    band = calibrate("mean", holdout)
    assert band.lower is None and band.upper == pytest.approx(0.3) and band.status(0.0) == "in_band"
    for bad in ("quantile:0.9,0.1", "quantile:0.5", "meanstd:-1", "median", "mean:1"):
        with pytest.raises(InputError):
            check_rule(bad)


def test_statuses_in_the_audit_follow_the_band(tiny_audit):
    band = tiny_audit.band
    holdout = sorted(r.ma for r in tiny_audit.of("holdout"))
    assert band.upper == pytest.approx(float(np.quantile(holdout, 0.95)))
    for row in tiny_audit.sequences:
        expected = "extractable" if row.ma > band.upper else "over_unlearned" if row.ma < band.lower else "in_band"
        assert row.status == expected


def test_auc_matches_scikit_learn_and_intervals_cover_it():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(1, 1, 12), rng.normal(0, 1, 48)
    labels = np.r_[np.ones(12), np.zeros(48)]
    expected = roc_auc_score(labels, np.r_[members, nonmembers])
    assert auc(members, nonmembers) == pytest.approx(expected)
    low, high = bootstrap_interval(members, nonmembers, seed=0)
    assert low < expected < high and high - low < 0.6
    low2, high2 = bootstrap_interval(-members, nonmembers, seed=0, two_sided=True)
    assert 0.5 <= low2 < 1 - auc(-members, nonmembers) < high2
    ties = [0.5, 0.5], [0.5, 0.5]
    assert auc(*ties) == 0.5 and bootstrap_interval(*ties) == [0.5, 0.5]


def test_privacy_report_on_the_tiny_model(tiny_audit):
    privacy = tiny_audit.privacy
    for name in ("loss", "zlib", "mink", "minkpp"):
        low, high = privacy[f"{name}_auc_ci"]
        assert low <= privacy[f"{name}_auc"] <= high
    assert privacy["loss_auc"] > 0.9  # the forget set is trained on: the attack sees it
    assert privacy["umia_auc"] == max(privacy["loss_auc"], 1 - privacy["loss_auc"])
    assert privacy["roc"]["loss"]["tpr"][-1] == 1.0


def test_el_can_be_limited_to_some_sets(tiny, tiny_loaded, tiny_audit):
    model, tokenizer, runtime = tiny_loaded
    settings = AuditSettings(el_n=[3], prefix_tokens=8, el_sets=["forget"])
    result = audit(model, tokenizer, tiny["sets"], settings, runtime)
    assert all(r.el == {} for r in result.of("holdout"))
    full = {r.id: r.el["3"] for r in tiny_audit.of("forget")}
    assert {r.id: r.el["3"] for r in result.of("forget")} == full
    assert result.summary("holdout")["mean_el"] == {"3": None}
    assert "el_3" in result.to_csv().splitlines()[0]


def test_by_default_el_is_computed_on_the_forget_sets_only(tiny, tiny_loaded, tiny_audit):
    """EL decodes every prefix; on unseen text that is every one, and the band already says what EL would."""
    model, tokenizer, runtime = tiny_loaded
    result = audit(model, tokenizer, tiny["sets"], AuditSettings(el_n=[3], prefix_tokens=8), runtime)
    assert AuditSettings().el_sets == ["forget", "earlier"]
    assert all(r.el == {} for r in result.of("holdout") + result.of("retain"))
    assert {r.id: r.el["3"] for r in result.of("forget")} == {r.id: r.el["3"] for r in tiny_audit.of("forget")}


def test_familywise_band_by_hand():
    """Two layers, rule quantile:0.2,0.8 (numpy's linear interpolation): each layer's upper edge is 0.42; the rows'
    largest excesses are 0.08, -0.22, -0.12, -0.02, 0.08, whose band is [-0.14, 0.08]."""
    holdout = np.array([[0.1, 0.5], [0.2, 0.1], [0.3, 0.2], [0.4, 0.3], [0.5, 0.4]])
    familywise = Familywise.calibrate("quantile:0.2,0.8", holdout)
    assert [b.upper for b in familywise.bands] == pytest.approx([0.42, 0.42])
    assert (familywise.band.lower, familywise.band.upper) == pytest.approx((-0.14, 0.08))
    best, excess = familywise.excess(holdout)
    assert best.tolist() == [1, 0, 0, 0, 0] and excess == pytest.approx([0.08, -0.22, -0.12, -0.02, 0.08])
    # Two of five unseen rows are above some layer's band; none is above the family-wise band.
    assert familywise.rate(holdout) == (0.4, 0.0)
    # A record above one layer's edge by 0.03 is not extractable under the lens; one above by 0.18 is.
    best, excess = familywise.excess(np.array([[0.45, 0.3], [0.1, 0.6]]))
    assert best.tolist() == [0, 1] and excess == pytest.approx([0.03, 0.18])
    assert [familywise.status(e) for e in excess] == ["in_band", EXTRACTABLE]


def test_familywise_band_keeps_the_unseen_rate_of_one_band():
    """Read at 29 independent layers, 1 - 0.95^29 = 77% of unseen records are above some layer's 95% edge; above
    the family-wise band, 5% are, as under one band (in-sample, 400 records)."""
    holdout = np.random.default_rng(0).random((400, 29))
    above_one, above = Familywise.calibrate("quantile:0.05,0.95", holdout).rate(holdout)
    assert above_one > 0.7 and above == pytest.approx(0.05, abs=0.003)
