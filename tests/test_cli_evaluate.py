"""Evaluation through the command line: unlearn --oracle --attacks --tasks, attack, audit --decoding/--oracle,
verify. Real subprocesses on the tiny memorizing model."""

from __future__ import annotations

import json

import pytest
from clirun import assert_refused, run_cli
from conftest import read_json

from unmemorize.evaluate.attacks import ATTACKS, DEFAULT_ATTACKS, AttackSettings

FAST = ["--el-n", "0", "--prefix-tokens", "8", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def evaluated_run(tiny, tiny_oracle, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-eval") / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--retain", tiny["files"]["retain"], "--general",
                     tiny["files"]["retain"], "--method", "sga", "--target", "ma", "--lr", "3e-4", "--retain-loss",
                     "nll", "--max-steps", "60", "--max-utility-drop", "10", "--oracle", tiny_oracle, "--attacks",
                     "--tasks", "unmemorize_pyfacts", *FAST, "--out", out)
    return out, result


def test_unlearn_with_oracle_attacks_and_tasks_writes_everything(evaluated_run, tiny, tiny_oracle):
    out, result = evaluated_run
    assert result.returncode == 0, result.stderr
    after = read_json(out / "after.json")
    assert list(after["attacks"]) == DEFAULT_ATTACKS
    for entry in after["attacks"].values():
        assert isinstance(entry["returned_extractable"], int) and isinstance(entry["returned_verbatim"], int)
        # --oracle with --attacks: the same attacks on the oracle, and what is returned beyond it
        assert "returned_extractable" in entry["oracle"]
        assert 0 <= entry["beyond_oracle_extractable"] <= entry["returned_extractable"]
    assert "beyond the oracle (extractable / verbatim)" in (out / "report.html").read_text()
    certified = read_json(out / "certificate.json")["attacks"]
    assert {name: a["beyond_oracle_extractable"] for name, a in certified.items()} == {
        name: a["beyond_oracle_extractable"] for name, a in after["attacks"].items()}
    assert 0 <= after["oracle"]["forget_quality"] <= 1
    assert "ref_auc" in after["privacy"] and "ref_auc_ci" in after["privacy"]
    run = read_json(out / "run.json")
    for when in ("before", "after"):
        assert run["utility"][when]["downstream"]["unmemorize_pyfacts"]["n_docs"] == 44
        assert run["utility"][when]["holdout_ppl"] > 1
    assert run["settings"]["evaluation"]["oracle"] == str(tiny_oracle)
    text = (out / "after.json").read_text() + (out / "run.json").read_text()
    assert all(s.text not in text for s in tiny["sets"]["forget"])
    assert "Attacks" in result.stdout and "Oracle" in result.stdout


def test_verify_passes_on_the_unlearned_model_and_fails_on_the_original(evaluated_run, tiny):
    out, _ = evaluated_run
    certificate = out / "certificate.json"
    good = run_cli("verify", "--certificate", certificate, "--model", out / "model", "--dtype", "float32")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run_cli("verify", "--certificate", certificate, "--model", tiny["model"], "--dtype", "float32")
    assert bad.returncode == 3
    assert "FAIL model_hash" in bad.stdout and "FAIL not_verbatim" in bad.stdout


def test_verify_refuses_a_bad_certificate_with_exit_2(tmp_path, tiny):
    broken = tmp_path / "certificate.json"
    broken.write_text("{not json")
    result = run_cli("verify", "--certificate", broken, "--model", tiny["model"])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_attack_command_writes_attack_json(tiny, tmp_path):
    out = tmp_path / "attack"
    result = run_cli("attack", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--attacks", "sampling,quantize_8bit", "--temperature", "0.3",
                     "--prefix-tokens", "8", "--dtype", "float32", "--out", out)
    assert result.returncode == 0, result.stderr
    report = read_json(out / "attack.json")
    assert set(report) >= {"sampling", "quantize_8bit", "baseline", "model"}
    assert report["sampling"]["forget_extracted"] >= 4  # f0-f3 are memorized: sampling finds them
    json.dumps(report)


def test_attack_command_reaches_every_setting_and_trains_benign_relearn_on_general_text(tiny, tmp_path):
    out = tmp_path / "attack"
    general = tmp_path / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog.\n\nPython lists keep their order.\n")
    result = run_cli("attack", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--attacks", "benign_relearn,noise", "--general", general,
                     "--attack-arg", "relearn_steps=2", "--attack-arg", "noise_draws=2", "--prefix-tokens", "8",
                     "--dtype", "float32", "--out", out)
    assert result.returncode == 0, result.stderr
    report = read_json(out / "attack.json")
    assert report["settings"]["attacks"]["relearn_steps"] == 2 and report["settings"]["attacks"]["noise_draws"] == 2
    # no --retain: benign_relearn trains on the general text given
    assert report["benign_relearn"]["trained_on"] == "general" and report["benign_relearn"]["trained_n"] == 2
    assert report["benign_relearn"]["steps"] == 2 and len(report["noise"]["draws"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--attack-arg", "noise_draws"], "--attack-arg 'noise_draws': expected KEY=VALUE"),
    (["--attack-arg", "no_such_setting=1"], "no-such-setting"),
    (["--attack-arg", "noise_sigma=-1"], "noise-sigma"),
    (["--attacks", "benign_relearn", "--benign-on", "retain"], "--benign-on retain needs --retain"),
    (["--attacks", "jailbreak"], "unknown attack"),
])
def test_bad_attack_options_exit_2_with_one_line(tiny, tmp_path, args, message):
    out = tmp_path / "attack"
    result = run_cli("attack", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], *args, "--out", out)
    assert_refused(result, message, out)


def test_attacks_lists_every_attack_and_setting():
    result = run_cli("attacks", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [n for n, a in listed["attacks"].items() if a["default"]] == DEFAULT_ATTACKS
    assert set(listed["attacks"]) == set(ATTACKS)
    assert set(listed["settings"]) == set(AttackSettings.model_fields) - {"attacks"}
    assert listed["settings"]["gcg_steps"]["default"] == AttackSettings().gcg_steps


def test_audit_through_a_decoding_filter_and_against_the_oracle(tiny, tiny_oracle, tmp_path):
    plain = run_cli("audit", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                    tiny["files"]["holdout"], *FAST, "--out", tmp_path / "plain", "--oracle", tiny_oracle)
    guarded = run_cli("audit", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                      tiny["files"]["holdout"], *FAST, "--out", tmp_path / "filter", "--decoding", "filter:4")
    assert plain.returncode == 0 and guarded.returncode == 0, plain.stderr + guarded.stderr
    before, after = read_json(tmp_path / "plain" / "audit.json"), read_json(tmp_path / "filter" / "audit.json")
    assert before["sets"]["forget"]["verbatim"] >= 4 and after["sets"]["forget"]["verbatim"] == 0
    assert after["decoding"]["weights_changed"] is False
    assert after["model"]["sha256"] == before["model"]["sha256"]  # the weights are the same
    assert before["oracle"]["forget_quality"] < 0.05


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "no_such_task_xyz"),
    (["--oracle", "/nonexistent/oracle"], "oracle"),
])
def test_bad_evaluation_input_exits_2_and_writes_nothing(tiny, tmp_path, args, message):
    out = tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--max-steps", "1", *FAST, *args, "--out", out)
    assert_refused(result, message, out, out.with_name("run.partial"))




def test_attack_against_the_oracle_counts_beyond_it(tiny, tiny_oracle, tmp_path):
    """The oracle never saw f0-f3: what an attack brings back on the memorizing model is beyond it. The model as
    its own oracle: every returned record is one the oracle shows too, so nothing is beyond it."""
    common = ("--forget", tiny["files"]["forget"], "--holdout", tiny["files"]["holdout"], "--attacks",
              "prefix,quantize_8bit", "--prefix-tokens", "8", "--dtype", "float32")
    out = tmp_path / "itself"
    result = run_cli("attack", "--model", tiny["model"], *common, "--oracle", tiny["model"], "--out", out)
    assert result.returncode == 0, result.stderr
    report = read_json(out / "attack.json")
    assert report["oracle"]["source"] == str(tiny["model"])
    for name in ("prefix", "quantize_8bit"):
        entry = report[name]
        assert entry["oracle"]["returned_extractable"] == entry["returned_extractable"]
        assert entry["beyond_oracle_extractable"] == entry["beyond_oracle_verbatim"] == 0
        assert all(r["oracle_status"] == r["status"] for r in entry["sequences"])
    assert "beyond the oracle" in result.stdout

    out = tmp_path / "oracle"
    result = run_cli("attack", "--model", tiny["model"], *common, "--oracle", tiny_oracle, "--out", out)
    assert result.returncode == 0, result.stderr
    prefix = read_json(out / "attack.json")["prefix"]
    rows = {r["id"]: r for r in prefix["sequences"]}
    # the prefix variations find the memorized records on the model; the oracle shows none of them
    assert all(rows[f]["status"] == "extractable" and rows[f]["oracle_status"] != "extractable"
               for f in ("f0", "f1", "f2", "f3"))
    assert prefix["beyond_oracle_extractable"] == prefix["returned_extractable"] - sum(
        r["returned_extractable"] and r["oracle_status"] == "extractable" for r in rows.values())


def test_attack_refuses_a_bad_oracle_before_attacking(tiny, tmp_path):
    out = tmp_path / "attack"
    result = run_cli("attack", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--oracle", tmp_path / "no-such-model", "--out", out)
    assert_refused(result, "no-such-model", out)
