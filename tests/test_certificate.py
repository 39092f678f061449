"""certificate.json on a real unlearning run of the tiny model: contents, verification, tampering, bad files."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest

from unmemorize.errors import InputError
from unmemorize.io.models import load_model, make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode
from unmemorize.report.certificate import (
    body_sha256,
    build_certificate,
    read_certificate,
    tokenizer_fingerprint,
    write_certificate,
)
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.runs.verify import verify_certificate

RUNTIME = make_runtime("cpu", "float32")
FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}


@pytest.fixture(scope="module")
def certified(tiny, tmp_path_factory):
    """An sga run that reaches the target, its certificate (as written and read back) and the unlearned model."""
    from tiny import sentences

    general = [Sequence(f"g{i}", text) for i, text in enumerate(sentences(10, seed=99))]
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    settings = UnlearnSettings(method="sga", target="ma", lr=3e-4, retain_loss="nll", max_steps=60,
                               max_utility_drop=10.0, audit=FAST_AUDIT)
    out = tmp_path_factory.mktemp("certificate") / "run"
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, out)
    assert result.target_reached, result.run["stop_reason"]
    model, tokenizer = load_model(out / "model", RUNTIME)
    run = json.loads((out / "run.json").read_text())
    max_tokens = settings.audit.max_tokens
    certificate = build_certificate(
        run, result.before, result.after, encode(tokenizer, sets["forget"], max_tokens),
        [s.id for s in sets["forget"]], tokenizer_fingerprint(tokenizer),
        holdout_ids=encode(tokenizer, sets["holdout"], max_tokens), holdout_names=[s.id for s in sets["holdout"]],
        sources={"forget": str(tiny["files"]["forget"]), "holdout": str(tiny["files"]["holdout"])})
    path = write_certificate(out, certificate)
    return {"path": path, "certificate": read_certificate(path), "model": model, "tokenizer": tokenizer,
            "sets": {"forget": sets["forget"], "holdout": sets["holdout"]}, "result": result, "run": run}


def names(result) -> set[str]:
    return {c["name"] for c in result.failures}


def test_the_certificate_holds_hashes_and_claims_but_no_text(certified, tiny):
    text = certified["path"].read_text()
    cert = certified["certificate"]
    for seq in tiny["sets"]["forget"] + tiny["sets"]["holdout"]:
        assert seq.text not in text
        assert " ".join(seq.text.split()[:4]) not in text  # not even the start of a record
    ids = encode(certified["tokenizer"], tiny["sets"]["forget"], cert["audit"]["max_tokens"])
    assert [s["sha256"] for s in cert["sequences"]] == \
        [hashlib.sha256(np.asarray(i, dtype="<i4").tobytes()).hexdigest() for i in ids]
    assert cert["claims"]["target_reached"] and cert["claims"]["extractable_after"] == 0
    assert cert["claims"]["extractable_before"] > 0
    assert cert["input_model"]["sha256"] != cert["output_model"]["sha256"]
    assert cert["band"]["n"] == cert["holdout"]["n"] == len(tiny["sets"]["holdout"])
    assert {s["status_before"] for s in cert["sequences"]} >= {"extractable"}
    assert cert["attacks"] is None and cert["oracle"] is None  # this run asked for neither


def test_attack_outcomes_and_the_oracle_summary_are_certified_when_measured(certified):
    result = certified["result"]
    after = copy.copy(result.after)
    after.extra = {"attacks": {"relearn": {"returned_extractable": np.int64(2), "returned_verbatim": 1, "n": 8,
                                           "sequences": [{"id": "f0"}]}},
                   "oracle": {"forget_quality": 0.42, "privleak": -0.1, "sequences": [{"id": "f0"}]}}
    forget = certified["sets"]["forget"]
    cert = build_certificate(certified["run"], result.before, after, encode(certified["tokenizer"], forget, 256),
                             [s.id for s in forget], tokenizer_fingerprint(certified["tokenizer"]),
                             created="2025-01-01T00:00:00+00:00", holdout_ids=[], holdout_names=[])
    assert cert["attacks"] == {"relearn": {"returned_extractable": 2, "returned_verbatim": 1}}
    assert cert["oracle"] == {"forget_quality": 0.42, "privleak": -0.1}
    assert cert["created"] == "2025-01-01T00:00:00+00:00"
    reordered = json.loads(json.dumps(dict(reversed(list(cert.items())))))
    assert reordered["integrity"]["sha256"] == body_sha256(reordered)  # canonical: key order does not matter


def test_verify_passes_on_the_unlearned_model(certified):
    result = verify_certificate(certified["certificate"], certified["model"], certified["tokenizer"], RUNTIME,
                                certified["sets"])
    assert result.ok, result.failures
    assert {"body_hash", "model_hash", "forget_sequences", "holdout_sequences", "not_extractable",
            "not_verbatim", "band"} <= {c["name"] for c in result.claims}


def test_verify_finds_the_sets_the_certificate_recorded(certified):
    result = verify_certificate(certified["certificate"], certified["model"], certified["tokenizer"], RUNTIME)
    assert result.ok, result.failures


def test_verify_fails_on_the_original_model(certified, tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    result = verify_certificate(certified["certificate"], model, tokenizer, runtime, certified["sets"])
    assert not result.ok
    assert {"model_hash", "not_extractable", "not_verbatim"} <= names(result)
    assert "body_hash" not in names(result) and "forget_sequences" not in names(result)
    reason = next(c["reason"] for c in result.failures if c["name"] == "not_extractable")
    assert "f0" in reason  # the memorized records are named


def test_the_loss_claims_hold_on_the_unlearned_model_and_fail_on_the_source(certified, tiny_loaded):
    cert = certified["certificate"]
    claims = cert["claims"]
    after = certified["result"].after.summary("forget")
    assert claims["target"] == "ma" and claims["loss_memorized_after"] == after["loss_memorized"]
    assert claims["no_loss_memorized_after"] == (after["loss_memorized"] == 0)
    assert claims["loss_over_unlearned_after"] == after["loss_over_unlearned"]
    assert claims["loss_memorized_before"] >= 4  # f0-f3 are far too likely under the source model
    assert cert["loss_band"]["score"] == "loss" and cert["loss_band"]["n"] == cert["holdout"]["n"]
    assert {s["loss_status_after"] for s in cert["sequences"]} <= {"memorized", "in_band", "over_unlearned"}

    unlearned = verify_certificate(cert, certified["model"], certified["tokenizer"], RUNTIME, certified["sets"])
    checked = {c["name"]: c for c in unlearned.claims}
    assert {"loss_memorized", "loss_over_unlearned", "loss_band"} <= set(checked)
    assert all(checked[name]["ok"] for name in ("loss_memorized", "loss_over_unlearned", "loss_band"))

    model, tokenizer, runtime = tiny_loaded
    source = verify_certificate(cert, model, tokenizer, runtime, certified["sets"])
    memorized = source.audit.summary("forget")["loss_memorized"]
    assert memorized > claims["loss_memorized_after"]  # the source model's forget set is memorized on loss
    assert "loss_memorized" in names(source)
    reason = next(c["reason"] for c in source.failures if c["name"] == "loss_memorized")
    assert "f0" in reason and f"certified {claims['loss_memorized_after']}" in reason


def test_a_certificate_made_before_the_loss_band_verifies_without_loss_claims(certified):
    old = copy.deepcopy(certified["certificate"])
    for key in ("loss_band", "loss_band_before"):
        del old[key]
    for key in ("target", "no_loss_memorized_after", "loss_memorized_before", "loss_memorized_after",
                "loss_over_unlearned_after"):
        del old["claims"][key]
    old["integrity"]["sha256"] = body_sha256(old)
    result = verify_certificate(old, certified["model"], certified["tokenizer"], RUNTIME, certified["sets"])
    assert result.ok, result.failures
    assert not {"loss_memorized", "loss_over_unlearned", "loss_band"} & {c["name"] for c in result.claims}


def test_an_edited_certificate_breaks_the_body_hash(certified):
    edited = copy.deepcopy(certified["certificate"])
    edited["sequences"][0]["status_before"] = "in_band"
    result = verify_certificate(edited, certified["model"], certified["tokenizer"], RUNTIME, certified["sets"])
    assert names(result) == {"body_hash"}


def test_a_changed_forget_sequence_fails_the_token_hash_claim(certified):
    forget = list(certified["sets"]["forget"])
    forget[2] = Sequence(forget[2].id, forget[2].text + " k0 v1")
    result = verify_certificate(certified["certificate"], certified["model"], certified["tokenizer"], RUNTIME,
                                {**certified["sets"], "forget": forget})
    assert "forget_sequences" in names(result)
    reason = next(c["reason"] for c in result.failures if c["name"] == "forget_sequences")
    assert "not certified: f2" in reason and "certified but not given: f2" in reason


def test_a_bad_certificate_file_is_an_input_error(certified, tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_certificate(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad JSON"):
        read_certificate(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        read_certificate(bad)
    broken = copy.deepcopy(certified["certificate"])
    del broken["output_model"]["sha256"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(InputError, match=r"missing key 'output_model\.sha256'"):
        read_certificate(bad)
