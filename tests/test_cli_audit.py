"""`unmemorize audit` end to end on the tiny model, and its bad-input paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clirun import run_cli

from unmemorize.io.models import folder_sha256


@pytest.fixture(scope="module")
def audit_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "out"
    before = folder_sha256(tiny["model"])
    files = tiny["files"]
    result = run_cli("audit", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--retain", files["retain"], "--out", out, "--el-n", "3,5", "--el-sets", "all",
                     "--prefix-tokens", "8", "--dtype", "float32")
    return result, out, before


def test_audit_writes_the_spec_shape(audit_run, tiny):
    result, out, before = audit_run
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "audit.json").read_text())
    assert set(report) == {"model", "settings", "band", "loss_band", "sets", "privacy", "sequences"}
    assert report["band"]["calibrated_on"] == "holdout" and report["band"]["n"] == 20
    assert set(report["sets"]) == {"forget", "holdout", "retain"}
    forget = report["sets"]["forget"]
    assert forget["n"] == 8 and forget["extractable"] >= 4 and {"mean_ma", "verbatim", "over_unlearned"} <= set(forget)
    for key in ("loss_auc", "zlib_auc", "mink_auc", "minkpp_auc", "umia_auc"):
        assert 0 <= report["privacy"][key] <= 1 and len(report["privacy"][key + "_ci"]) == 2
    row = report["sequences"][0]
    assert set(row) == {"set", "id", "hash", "n_tokens", "ma", "el", "verbatim", "loss", "zlib", "mink", "minkpp",
                        "status", "loss_status"}
    assert set(row["el"]) == {"3", "5"}
    csv_lines = (out / "audit.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 40 and csv_lines[0].startswith("set,id,hash,n_tokens,ma,el_3,el_5")
    assert folder_sha256(tiny["model"]) == before  # the input model is never modified


def test_audit_writes_the_loss_band_and_each_loss_status(audit_run):
    """The loss band is the --band rule (default quantile:0.05,0.95) on the holdout's per-sequence losses, and
    each loss status and count follows from the losses written beside it."""
    result, out, _ = audit_run
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "audit.json").read_text())
    holdout = [row["loss"] for row in report["sequences"] if row["set"] == "holdout"]
    band = report["loss_band"]
    assert band == {"rule": "quantile:0.05,0.95", "lower": pytest.approx(float(np.quantile(holdout, 0.05))),
                    "upper": pytest.approx(float(np.quantile(holdout, 0.95))), "calibrated_on": "holdout", "n": 20,
                    "score": "loss", "median": pytest.approx(float(np.median(holdout)))}
    for row in report["sequences"]:
        expected = ("memorized" if row["loss"] < band["lower"] else
                    "over_unlearned" if row["loss"] > band["upper"] else "in_band")
        assert row["loss_status"] == expected, row["id"]
    for name, summary in report["sets"].items():
        rows = [row for row in report["sequences"] if row["set"] == name]
        for key, status in (("loss_memorized", "memorized"), ("loss_in_band", "in_band"),
                            ("loss_over_unlearned", "over_unlearned")):
            assert summary[key] == sum(row["loss_status"] == status for row in rows), (name, key)
    assert report["sets"]["forget"]["loss_memorized"] >= 4  # f0-f3 are memorized: far too likely
    header, *lines = (out / "audit.csv").read_text().splitlines()
    assert header.endswith(",status,loss_status")
    assert [line.rsplit(",", 1)[1] for line in lines] == [row["loss_status"] for row in report["sequences"]]
    assert "Loss band" in result.stdout


def test_no_text_anywhere_unless_show_text(audit_run, tiny, tmp_path):
    result, out, _ = audit_run
    texts = [s.text for s in tiny["sets"]["forget"]]
    written = (out / "audit.json").read_text() + (out / "audit.csv").read_text() + result.stdout
    assert not any(text in written or text[:20] in written for text in texts)
    shown = run_cli("audit", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--el-n", "0",
                    "--show-text", "--out", tmp_path / "t", "--dtype", "float32")
    assert shown.returncode == 0, shown.stderr
    report = json.loads((tmp_path / "t" / "audit.json").read_text())
    assert report["sequences"][0]["text"] == texts[0] and report["sequences"][0]["el"] == {}
    assert report["band"] is None and report["sequences"][0]["status"] is None
    assert report["loss_band"] is None and report["sequences"][0]["loss_status"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--forget", "{missing}"], "file not found"),
    (["--forget", "{bad_json}"], "bad.jsonl:2: bad JSON"),
    (["--forget", "{forget}", "--holdout", "{dup}"], "dup.jsonl:2: duplicate id"),
    (["--forget", "{forget}", "--band", "quantile:0.9"], "--band"),
    (["--forget", "{forget}", "--el-n", "x"], "--el-n"),
    (["--forget", "{forget}", "--max-tokens", "1"], "--max-tokens"),
    (["--forget", "{forget}", "--device", "tpu"], "--device"),
    (["--forget", "{forget}", "--dtype", "int3"], "--dtype"),
    (["--forget", "{forget}", "--no-such-flag"], "No such option"),
    (["--forget", "{forget}", "--model-override"], "No such option"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "k0 v1"}\n{"text": \n')
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "k0 v1"}\n{"id": "a", "text": "k0 v2"}\n')
    paths = {"missing": tmp_path / "missing.jsonl", "bad_json": tmp_path / "bad.jsonl", "dup": tmp_path / "dup.jsonl",
             "forget": tiny["files"]["forget"]}
    out = tmp_path / "out"
    result = run_cli("audit", "--model", tiny["model"], *[a.format(**paths) for a in args], "--out", out)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "no_config", "pickle_only", "broken_weights", "file", "hub_id"])
def test_bad_model_exits_2_with_one_line(tiny, tmp_path, kind):
    model = tmp_path / "model"
    if kind == "no_config":
        model.mkdir()
    elif kind == "pickle_only":
        model.mkdir()
        (model / "config.json").write_text((tiny["model"] / "config.json").read_text())
        (model / "pytorch_model.bin").write_bytes(b"")
    elif kind == "broken_weights":
        model.mkdir()
        for file in tiny["model"].iterdir():
            (model / file.name).write_bytes(file.read_bytes())
        (model / "model.safetensors").write_bytes(b"garbage")
    elif kind == "file":
        model = tmp_path / "model.txt"
        model.write_text("x")
    elif kind == "hub_id":
        model = "no-such-org/no-such-model"  # the real hub code path; offline here, so it must fail cleanly
    env = {"HF_HUB_OFFLINE": "1"}
    result = run_cli("audit", "--model", model, "--forget", tiny["files"]["forget"], "--out", tmp_path / "out",
                     env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"unmemorize: error: model {model}") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()
