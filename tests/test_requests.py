"""Sequential deletion requests (`unlearn --previous`) and `compare`, through the real command line."""

from __future__ import annotations

import json

import pytest
from clirun import run_cli
from conftest import read_json

from unmemorize.io.sets import write_jsonl
from unmemorize.io.tokens import ids_sha256

FAST = ["--el-n", "0", "--prefix-tokens", "8", "--dtype", "float32", "--device", "cpu"]
SGA = ["--method", "sga", "--target", "ma", "--lr", "3e-4", "--retain-loss", "nll", "--max-steps", "60",
       "--max-utility-drop", "10"]


@pytest.fixture(scope="module")
def requests(tiny, tmp_path_factory):
    """Two requests on the tiny model: f0, f1 first, then f2, f3 continuing from the first run."""
    root = tmp_path_factory.mktemp("requests")
    forget = tiny["sets"]["forget"]
    write_jsonl(root / "first.jsonl", forget[:2])
    write_jsonl(root / "second.jsonl", forget[2:4])
    write_jsonl(root / "general.jsonl", tiny["sets"]["retain"][:4])
    common = ["--holdout", tiny["files"]["holdout"], "--retain", tiny["files"]["retain"], "--general",
              root / "general.jsonl", *SGA, *FAST]
    first = run_cli("unlearn", "--model", tiny["model"], "--forget", root / "first.jsonl", "--out", root / "one",
                    *common)
    second = run_cli("unlearn", "--previous", root / "one", "--forget", root / "second.jsonl", "--out", root / "two",
                     *common)
    return {"root": root, "first": first, "second": second, "common": common}


def test_a_second_request_continues_the_first_and_re_audits_it(requests, tiny):
    root = requests["root"]
    assert requests["first"].returncode == 0, requests["first"].stderr
    assert requests["second"].returncode == 0, requests["second"].stderr
    run = read_json(root / "two" / "run.json")
    assert run["input_model"]["source"] == str(root / "one" / "model")
    assert run["input_model"]["sha256"] == read_json(root / "one" / "after.json")["model"]["sha256"]
    earlier = run["earlier"]
    after = read_json(root / "two" / "after.json")
    rows = [s for s in after["sequences"] if s["set"] == "earlier"]
    assert sorted(r["id"] for r in rows) == ["r1:f0", "r1:f1"]
    assert earlier["after"]["extractable"] == sum(r["status"] == "extractable" for r in rows)
    assert earlier["stayed_forgotten"] == (earlier["after"]["extractable"] == 0 and earlier["after"]["verbatim"] == 0)
    assert earlier["stayed_forgotten"]  # sga on f2, f3 did not bring f0, f1 back on the tiny model
    # the loop watched the earlier sequences too (it would push any that rose above the band again)
    first_line = json.loads((root / "two" / "trajectory.jsonl").read_text().splitlines()[0])
    assert {"r1:f0", "r1:f1", "f2", "f3"} <= set(first_line["ma"])
    assert run["target_reached"] == (after["sets"]["forget"]["extractable"] == 0 and earlier["stayed_forgotten"]
                                     and after["sets"]["forget"]["verbatim"] == 0)
    ledger = read_json(root / "two" / "ledger.json")["requests"]
    assert [len(r["sequences"]) for r in ledger] == [2, 2]
    assert ledger[0]["forget_source"] == str((root / "first.jsonl").resolve())
    text = json.dumps(ledger)
    assert all(s.text not in text for s in tiny["sets"]["forget"])  # hashes, never text
    from unmemorize.io.models import load_model, make_runtime
    from unmemorize.io.tokens import encode

    _, tokenizer = load_model(tiny["model"], make_runtime("cpu", "float32"))
    assert ledger[1]["sequences"][0]["sha256"] == ids_sha256(encode(tokenizer, tiny["sets"]["forget"][2:3], 256)[0])


def test_a_changed_earlier_forget_file_is_refused(requests, tiny, tmp_path):
    root = requests["root"]
    changed = tmp_path / "first.jsonl"
    write_jsonl(changed, tiny["sets"]["forget"][:2])
    ledger = read_json(root / "one" / "ledger.json")
    ledger["requests"][0]["forget_source"] = str(changed)
    (tmp_path / "one").mkdir()
    for name in ("run.json", "model"):
        (tmp_path / "one" / name).symlink_to(root / "one" / name)
    (tmp_path / "one" / "ledger.json").write_text(json.dumps(ledger))
    changed.write_text(changed.read_text().replace("k0 v", "k0 vv", 1))
    result = run_cli("unlearn", "--previous", tmp_path / "one", "--forget", root / "second.jsonl", "--out",
                     tmp_path / "two", *requests["common"])
    assert result.returncode == 2
    assert "changed since it was unlearned" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "two").exists() and not (tmp_path / "two.partial").exists()


def test_previous_must_be_a_run_folder(tiny, tmp_path):
    result = run_cli("unlearn", "--previous", tmp_path, "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--out", tmp_path / "x")
    assert result.returncode == 2 and "--previous" in result.stderr


def test_compare_runs_every_method_from_the_same_model_and_ranks_them(tiny, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("compare", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
                     tiny["files"]["holdout"], "--retain", tiny["files"]["retain"], "--methods", "sga,ga",
                     "--target", "ma", "--lr", "3e-4", "--max-steps", "40", "--max-utility-drop", "10", "--out", out,
                     *FAST)
    assert result.returncode in (0, 3), result.stderr
    rows = read_json(out / "compare.json")["rows"]
    assert {r["run"] for r in rows} == {"sga", "ga"}
    keys = [(not r["target_reached"], r["over_unlearned"], r["utility_loss"], r["seconds"]) for r in rows]
    assert keys == sorted(keys)
    hashes = {read_json(out / "runs" / name / "run.json")["input_model"]["sha256"] for name in ("sga", "ga")}
    assert len(hashes) == 1  # both from the same input model
    assert result.returncode == (0 if all(r["target_reached"] for r in rows) else 3)
    assert (out / "report.html").exists()


def test_compare_refuses_duplicate_or_unknown_methods(tiny, tmp_path):
    base = ["compare", "--model", tiny["model"], "--forget", tiny["files"]["forget"], "--holdout",
            tiny["files"]["holdout"], "--out", tmp_path / "c"]
    duplicate = run_cli(*base, "--methods", "sga,sga")
    unknown = run_cli(*base, "--methods", "sga,nope")
    assert duplicate.returncode == 2 and "distinct" in duplicate.stderr
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    assert not (tmp_path / "c").exists()
