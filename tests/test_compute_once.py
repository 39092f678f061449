"""What a run knows it does not compute again: token ids, the unchanged model's scores (the loop's step 0, its
band, NPO's reference), the source model and the oracle's audit in a compare."""

from __future__ import annotations

import torch

import unmemorize.io.models as models
import unmemorize.measure.audit as audit_module
import unmemorize.runs.compare as compare_module
import unmemorize.runs.run as run_module
from unmemorize.evaluate.attacks import AttackSettings
from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.scoring import score_tokens
from unmemorize.runs.compare import compare
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import audited_scores
from unmemorize.unlearning.context import Context
from unmemorize.unlearning.methods.npo import NPO

RUNTIME = make_runtime("cpu", "float32")
FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}


def sets_of(tiny) -> dict:
    return {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}


def general() -> list[Sequence]:
    from tiny import sentences

    return [Sequence(f"g{i}", text) for i, text in enumerate(sentences(6, seed=99))]


def test_npo_reference_from_the_audit_is_the_one_it_would_compute(tiny_loaded, tiny):
    model, tokenizer, runtime = tiny_loaded
    sets = sets_of(tiny)
    audited = audit(model, tokenizer, sets, AuditSettings(**FAST_AUDIT), runtime)
    ids = encode(tokenizer, sets["forget"], 256)
    computed, reused = NPO(), NPO()
    computed.prepare(Context(model=model, runtime=runtime, pad_id=pad_id_of(tokenizer), forget_ids=ids))
    reused.prepare(Context(model=model, runtime=runtime, pad_id=pad_id_of(tokenizer), forget_ids=ids,
                           before=audited_scores(audited, ["forget"], ["holdout"])))
    assert torch.equal(computed.reference, reused.reference)
    # and after a step has changed the weights, the audit's scores are not used
    stale = {"forget": score_tokens(model, [i[:3] for i in ids], runtime, pad_id=pad_id_of(tokenizer))}
    again = NPO()
    again.prepare(Context(model=model, runtime=runtime, pad_id=pad_id_of(tokenizer), forget_ids=ids, before=stale,
                          changed=True))
    assert torch.equal(again.reference, computed.reference)


def test_a_run_encodes_each_set_once_and_scores_the_unchanged_model_once(tiny, tmp_path, monkeypatch):
    """The audit before scores forget and holdout; the loop's step 0 (scores and band) reuses them: the only
    scoring passes over the forget set are the audit before's, the ones after each step, and the audit after."""
    calls = {"encode": [], "lean": 0}
    real_encode, real_lean = run_module.encode, __import__("unmemorize.unlearning.target", fromlist=["x"]).lean_scores
    import unmemorize.unlearning.target as target_module

    def counting_encode(tokenizer, sequences, max_tokens, set_name="set"):
        calls["encode"].append(set_name)
        return real_encode(tokenizer, sequences, max_tokens, set_name)

    def counting_lean(*args, **kwargs):
        calls["lean"] += 1
        return real_lean(*args, **kwargs)

    monkeypatch.setattr(run_module, "encode", counting_encode)
    monkeypatch.setattr(audit_module, "encode", counting_encode)
    monkeypatch.setattr(target_module, "lean_scores", counting_lean)
    settings = UnlearnSettings(method="sga", target="ma", lr=3e-4, stop="steps", max_steps=2, recalibrate_every=1,
                               max_utility_drop=10.0, audit=FAST_AUDIT)
    result = run_module.unlearn(str(tiny["model"]), sets_of(tiny), general(), settings, RUNTIME, tmp_path / "run")
    assert sorted(calls["encode"]) == ["forget", "general", "holdout", "retain"]
    # steps 0, 1, 2 each measure the forget set and calibrate the band; step 0's two come from the audit
    assert result.run["steps"] == 2 and calls["lean"] == 2 * 2


def test_compare_loads_the_model_once_and_audits_the_oracle_once(tiny, tiny_oracle, tmp_path, monkeypatch):
    loads: list[str] = []
    real_load = models.load_model

    def counting_load(spec, *args, **kwargs):
        loads.append(str(spec))
        return real_load(spec, *args, **kwargs)

    monkeypatch.setattr(compare_module, "load_model", counting_load)
    monkeypatch.setattr(run_module, "load_model", counting_load)
    import unmemorize.evaluate.suite as suite

    monkeypatch.setattr(suite, "load_model", counting_load)
    runs = {name: UnlearnSettings(method=name, target="ma", lr=3e-4, stop="steps", max_steps=1, max_utility_drop=10.0,
                                  audit=FAST_AUDIT, evaluation={"oracle": str(tiny_oracle), "health": False})
            for name in ("ga", "sga")}
    results = compare(str(tiny["model"]), sets_of(tiny), general(), runs, RUNTIME, tmp_path / "cmp")
    assert loads == [str(tiny["model"]), str(tiny_oracle)]
    assert all("oracle" in r.after.extra for r in results)

    # with --attacks the oracle is attacked too: once for both runs (loaded once more, for the attacks)
    loads.clear()
    for settings in runs.values():
        settings.evaluation.attacks = AttackSettings(attacks=["quantize_8bit"])
    results = compare(str(tiny["model"]), sets_of(tiny), general(), runs, RUNTIME, tmp_path / "attacked")
    assert loads == [str(tiny["model"]), str(tiny_oracle), str(tiny_oracle)]
    assert all("beyond_oracle_extractable" in r.after.extra["attacks"]["quantize_8bit"] for r in results)
    assert results[0].run["input_model"]["sha256"] == results[1].run["input_model"]["sha256"]
