"""Evaluation around the audit: the oracle comparison, token counting, and the evaluation inside `unlearn`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_json

from unmemorize.evaluate.efficiency import TokenCounter
from unmemorize.evaluate.oracle import oracle_report
from unmemorize.evaluate.suite import audit_oracle
from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.scoring import score_tokens
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn

RUNTIME = make_runtime("cpu", "float32")
SETTINGS = AuditSettings(el_n=[], prefix_tokens=8)


@pytest.fixture(scope="module")
def audits(tiny, tiny_loaded, tiny_oracle):
    model, tokenizer, runtime = tiny_loaded
    sets = {k: tiny["sets"][k] for k in ("forget", "holdout")}
    victim = audit(model, tokenizer, sets, SETTINGS, runtime)
    oracle = audit_oracle(str(tiny_oracle), sets, SETTINGS, runtime)
    return victim, oracle


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Largest gap between the two empirical CDFs, evaluated at every sample point."""
    points = np.sort(np.r_[a, b])
    cdf = lambda x: np.searchsorted(np.sort(x), points, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def test_the_oracle_never_memorized_the_request(audits):
    victim, oracle = audits
    assert victim.summary("forget")["verbatim"] >= 4  # f0-f3 are memorized by the victim
    assert oracle.summary("forget")["verbatim"] == 0
    assert oracle.summary("forget")["extractable"] <= 1  # looks like holdout under the oracle's own band


def test_oracle_report_against_an_independent_computation(audits):
    victim, oracle = audits
    report = oracle_report(victim, oracle)
    mine = [r.loss for r in victim.of("forget")]
    theirs = [r.loss for r in oracle.of("forget")]
    assert report["ks_statistic"] == pytest.approx(ks_statistic(mine, theirs))
    # The victim's forget losses sit far below the oracle's: the distributions differ, forget quality is low.
    assert report["forget_quality"] < 0.05
    expected = (victim.privacy["mink_auc"] - oracle.privacy["mink_auc"]) / oracle.privacy["mink_auc"]
    assert report["privleak"] == pytest.approx(expected)
    assert report["privleak"] > 0.2  # the victim leaks membership far more than the oracle
    # the oracle's own U-MIA (forget vs holdout under the oracle), the reference a run's umia is held to
    assert report["umia_auc"] == oracle.privacy["umia_auc"] < victim.privacy["umia_auc"]
    assert report["status_agreement"] == pytest.approx(
        np.mean([a.status == b.status for a, b in zip(victim.of("forget"), oracle.of("forget"), strict=True)]))
    json.dumps(report)


def test_the_oracle_against_itself_is_perfect(audits):
    _, oracle = audits
    report = oracle_report(oracle, oracle)
    assert report["forget_quality"] == 1.0 and report["privleak"] == 0.0 and report["status_agreement"] == 1.0


def test_token_counter_counts_unpadded_tokens_of_every_forward(tiny, tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    ids = encode(tokenizer, tiny["sets"]["holdout"], 256)
    counter = TokenCounter(model)
    score_tokens(model, ids, runtime, batch_size=4)
    assert counter.close() == sum(len(i) for i in ids)
    score_tokens(model, ids[:2], runtime)
    assert counter.tokens == sum(len(i) for i in ids)  # closed: no more counting


def test_unlearn_with_an_oracle_writes_the_comparison(tiny, tiny_oracle, tmp_path):
    general = [Sequence(f"g{i}", s.text) for i, s in enumerate(tiny["sets"]["retain"][:4])]
    settings = UnlearnSettings(method="ga", lr=3e-4, stop="steps", max_steps=3, max_utility_drop=10.0,
                               audit={"el_n": [], "prefix_tokens": 8}, evaluation={"oracle": str(tiny_oracle)})
    sets = {k: tiny["sets"][k] for k in ("forget", "holdout", "retain")}
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "run")
    after, before = read_json(tmp_path / "run" / "after.json"), read_json(tmp_path / "run" / "before.json")
    assert {"forget_quality", "privleak", "oracle_forget", "sequences"} <= after["oracle"].keys()
    # three steps of ascent moved the forget losses toward the oracle's
    assert after["oracle"]["ks_statistic"] <= before["oracle"]["ks_statistic"]
    run = read_json(tmp_path / "run" / "run.json")
    assert run["tokens"]["backward"] > 0 and run["tokens"]["forward"] > run["tokens"]["backward"]
    assert {"audit_before", "unlearn", "audit_after", "evaluation"} <= run["phase_seconds"].keys()
    assert run["utility"]["after"]["holdout_ppl"] > 1
    assert 0 <= run["utility"]["after"]["generation"]["repeated_ngram_share"] <= 1
    assert result.after.extra["oracle"]["model"]["source"] == str(tiny_oracle)

