"""The loss band (the --band rule on the holdout loss), loss statuses, and the `--target` they feed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from clirun import run_cli

from unmemorize.io.models import folder_sha256, make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.band import (
    IN_BAND,
    MEMORIZED,
    OVER_UNLEARNED,
    LossBand,
    calibrate,
    calibrate_loss,
)
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.target import BAND, OVER_LEFT, TARGET_REACHED, Target, selected

RUNTIME = make_runtime("cpu", "float32")
FAST_AUDIT = {"el_n": [], "prefix_tokens": 8, "batch_size": 8}
LOSSES = [2.0, 1.0, 3.5, 4.0, 2.5, 3.0]


# ---- the band and statuses against a hand computation -----------------------------------------------------


def test_quantile_rule_takes_numpy_quantiles_of_the_holdout_losses():
    band = calibrate_loss("quantile:0.1,0.8", LOSSES)
    assert band.lower == pytest.approx(np.quantile(LOSSES, 0.1)) == pytest.approx(1.5)
    assert band.upper == pytest.approx(np.quantile(LOSSES, 0.8)) == pytest.approx(3.5)
    assert band.n == len(LOSSES)
    assert band.to_json() == {"rule": "quantile:0.1,0.8", "lower": band.lower, "upper": band.upper,
                              "calibrated_on": "holdout", "n": 6, "score": "loss",
                              "median": pytest.approx(float(np.median(LOSSES)))}
    # the MA band of the same values has the same edges (one rule, two scores)
    ma = calibrate("quantile:0.1,0.8", LOSSES)
    assert (ma.lower, ma.upper) == (band.lower, band.upper)


def test_meanstd_rule_is_mean_plus_minus_k_population_std():
    band = calibrate_loss("meanstd:1.5", LOSSES)
    mean, std = np.mean(LOSSES), np.std(LOSSES)  # population std, ddof=0
    assert band.lower == pytest.approx(mean - 1.5 * std) and band.upper == pytest.approx(mean + 1.5 * std)
    zero = calibrate_loss("meanstd:0", LOSSES)
    assert zero.lower == zero.upper == pytest.approx(mean)


def test_mean_rule_has_only_the_lower_edge_for_loss():
    band = calibrate_loss("mean", LOSSES)
    assert band.lower == pytest.approx(np.mean(LOSSES)) and band.upper is None
    assert band.status(band.lower - 1e-9) == MEMORIZED
    assert band.status(band.lower) == IN_BAND
    assert band.status(1e6) == IN_BAND  # no upper edge: nothing is over-unlearned under the aggregate rule
    ma = calibrate("mean", LOSSES)  # MA runs the other way: upper = mean, no lower
    assert ma.lower is None and ma.upper == pytest.approx(np.mean(LOSSES))


@pytest.mark.parametrize(("loss", "status"), [
    (0.5, MEMORIZED), (1.4999, MEMORIZED), (1.5, IN_BAND), (2.7, IN_BAND), (3.5, IN_BAND), (3.5001, OVER_UNLEARNED),
    (9.0, OVER_UNLEARNED),
])
def test_loss_under_the_band_is_memorized_above_it_over_unlearned_and_an_edge_is_in_band(loss, status):
    band = LossBand("quantile:0.1,0.8", 1.5, 3.5, 6)
    assert band.status(loss) == status


def test_a_bad_rule_is_refused_for_the_loss_band_too():
    from unmemorize.errors import InputError

    with pytest.raises(InputError, match="--band"):
        calibrate_loss("quantile:0.9,0.1", LOSSES)


# ---- an audit of the tiny model ---------------------------------------------------------------------------


def test_audit_gives_every_row_a_loss_status_from_the_holdout_loss_band(tiny, tiny_loaded):
    model, tokenizer, runtime = tiny_loaded
    for rule in ("quantile:0.05,0.95", "meanstd:1", "mean"):
        result = audit(model, tokenizer, tiny["sets"], AuditSettings(**FAST_AUDIT, band=rule), runtime)
        holdout = [r.loss for r in result.of("holdout")]
        assert result.loss_band == calibrate_loss(rule, holdout)
        written = result.to_json()
        assert written["loss_band"] == result.loss_band.to_json() and written["loss_band"]["score"] == "loss"
        assert written["band"] == result.band.to_json() and "score" not in written["band"]  # unchanged shape
        for row in written["sequences"]:
            assert row["loss_status"] == result.loss_band.status(row["loss"])
        forget = written["sets"]["forget"]
        assert forget["loss_memorized"] + forget["loss_in_band"] + forget["loss_over_unlearned"] == forget["n"]
        assert forget["loss_memorized"] >= 4, rule  # f0-f3 are memorized
        # the paper's c(F) and the MA statuses are what they always were
        assert forget["extractable"] == sum(r.ma > result.band.upper for r in result.of("forget"))
        assert not result.reached("indistinguishable") and not result.reached("ma")


# ---- the target check ---------------------------------------------------------------------------------------


class Scored(SimpleNamespace):
    def verbatim(self, prefix_tokens: int) -> bool:
        return self.copied


def make_target(target: str, monkeypatch=None) -> Target:
    settings = UnlearnSettings(target=target, stop="band", audit=FAST_AUDIT)
    ctx = SimpleNamespace(changed=True, before={})
    band = calibrate("quantile:0,1", [0.3, 0.5])  # MA in [0.3, 0.5]
    loss_band = LossBand("quantile:0,1", 2.0, 4.0, 2)  # loss in [2, 4]
    made = Target(ctx, None, settings, band, 0.4, loss_band)
    made.calibrate = lambda: made.band  # the bands above stand for a fresh calibration
    return made


SCORES = [Scored(ma=0.9, loss=0.5, copied=True),  # 0: extractable (and memorized on loss)
          Scored(ma=0.4, loss=1.0, copied=False),  # 1: in band on MA, memorized on loss
          Scored(ma=0.4, loss=5.0, copied=False),  # 2: in band on MA, over-unlearned on loss
          Scored(ma=0.4, loss=3.0, copied=False)]  # 3: in band on both


def test_target_ma_ignores_the_loss_band():
    check = make_target("ma").check(SCORES, recalibrate=False)
    assert check.above == [0] and check.blocking == [0] and check.reason is None
    assert check.over == [2]  # reported, blocks nothing under `ma`
    assert make_target("ma").check(SCORES[1:], recalibrate=False).reason == TARGET_REACHED


def test_target_indistinguishable_pushes_down_loss_memorized_and_never_the_over_unlearned():
    check = make_target("indistinguishable").check(SCORES, recalibrate=False)
    assert check.above == [0, 1] and check.over == [2] and check.blocking == [0, 1, 2] and check.reason is None
    assert selected(BAND, check.above, len(SCORES)) == [0, 1]  # 2 gets no forgetting gradient
    left = make_target("indistinguishable").check(SCORES[2:], recalibrate=False)
    assert left.above == [] and left.over == [0] and left.reason == OVER_LEFT.format(count=1)
    assert left.reason != TARGET_REACHED
    assert make_target("indistinguishable").check(SCORES[3:], recalibrate=False).reason == TARGET_REACHED


# ---- runs on the tiny model -----------------------------------------------------------------------------


def test_target_indistinguishable_is_reached_only_with_every_forget_loss_in_band(tiny, general, tmp_path):
    sets = {k: v for k, v in tiny["sets"].items() if k in ("forget", "holdout", "retain")}
    settings = UnlearnSettings(method="sga", lr=3e-4, retain_loss="nll", max_steps=60, max_utility_drop=10.0,
                               audit=FAST_AUDIT, target="indistinguishable")
    result = unlearn(str(tiny["model"]), sets, general, settings, RUNTIME, tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    after = json.loads((tmp_path / "run" / "after.json").read_text())
    forget = [row for row in after["sequences"] if row["set"] == "forget"]
    in_band = all(row["loss_status"] == "in_band" for row in forget)
    ma_reached = after["sets"]["forget"]["extractable"] == 0 and after["sets"]["forget"]["verbatim"] == 0
    assert run["target"] == "indistinguishable" and run["settings"]["target"] == "indistinguishable"
    assert run["target_reached"] == (ma_reached and in_band) == result.after.reached("indistinguishable")
    assert run["forget"]["loss_memorized_after"] == after["sets"]["forget"]["loss_memorized"] == 0
    assert run["forget"]["loss_memorized_before"] >= 4
    assert run["forget"]["loss_over_unlearned_after"] == after["sets"]["forget"]["loss_over_unlearned"]
    if not run["target_reached"]:  # only over-unlearned sequences were left: the loop stopped, pushing no further
        assert run["stop_reason"].startswith("nothing left to push down"), run["stop_reason"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()]
    assert all(len(line["loss_band"]) == 2 for line in lines)
    certificate = json.loads((tmp_path / "run" / "certificate.json").read_text())
    assert certificate["claims"]["target"] == "indistinguishable"
    assert certificate["claims"]["target_reached"] == run["target_reached"]
    assert certificate["loss_band"] == after["loss_band"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="loss-band"' in html and "memorized on loss" in html and "loss status after" in html
    assert "Memorized on loss" in html and "indistinguishable" in html


def test_terminal_tables_show_the_loss_band_and_loss_counts(tiny, tiny_loaded):
    from rich.console import Console

    from unmemorize.report.terminal import compare_table, print_audit

    model, tokenizer, runtime = tiny_loaded
    result = audit(model, tokenizer, tiny["sets"], AuditSettings(**FAST_AUDIT), runtime)
    console = Console(width=250, record=True)
    print_audit(result, console)
    text = console.export_text()
    lower, upper = result.loss_band.lower, result.loss_band.upper
    assert f"Loss band (same rule and holdout): loss in [{lower:.3f}, {upper:.3f}]" in text
    assert "loss memorized" in text and "loss status" in text and "memorized" in text
    row = {"run": "sga", "target": "indistinguishable", "target_reached": False, "extractable_before": 8,
           "extractable": 0, "verbatim_before": 4, "verbatim": 0, "over_unlearned": 0, "loss_memorized_before": 8,
           "loss_memorized": 0, "loss_over_unlearned": 1, "retain_ma_before": 0.9, "retain_ma": 0.8,
           "general_ppl_before": 10.0, "general_ppl": 11.0, "utility_loss": 0.1, "steps": 3, "seconds": 1.0}
    console = Console(width=250, record=True)
    console.print(compare_table([row]))
    text = console.export_text()
    assert "not reached (indistinguishable)" in text and "loss over-unlearned" in text and "8 → 0" in text


def _cli_args(tiny, folder):
    from tiny import sentences

    from unmemorize.io.sets import write_jsonl

    write_jsonl(folder / "general.jsonl", [Sequence(f"g{i}", t) for i, t in enumerate(sentences(10, seed=99))])
    files = tiny["files"]
    return ["--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"], "--retain",
            files["retain"], "--general", folder / "general.jsonl", "--method", "gd", "--stop", "steps",
            "--max-steps", "4", "--lr", "3e-4", "--max-utility-drop", "10", "--el-n", "0", "--prefix-tokens", "8",
            "--dtype", "float32"]


def test_target_indistinguishable_is_the_default_and_ma_the_papers(tiny, tmp_path):
    """No --target is --target indistinguishable, to the byte; --target ma judges on MA and verbatim alone."""
    args = _cli_args(tiny, tmp_path)
    plain = run_cli("unlearn", *args, "--out", tmp_path / "plain")
    flagged = run_cli("unlearn", *args, "--target", "indistinguishable", "--out", tmp_path / "flagged")
    ma = run_cli("unlearn", *args, "--target", "ma", "--out", tmp_path / "ma")
    for result in (plain, flagged, ma):
        assert result.returncode in (0, 3), result.stderr
    assert plain.returncode == flagged.returncode
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("plain", "flagged", "ma")]
    varying = {"out", "seconds", "phase_seconds", "peak_memory_mb", "peak_gpu_memory_mb"}
    assert {k: v for k, v in runs[0].items() if k not in varying} == {k: v for k, v in runs[1].items()
                                                                       if k not in varying}
    assert runs[0]["target"] == runs[0]["settings"]["target"] == "indistinguishable"
    after = json.loads((tmp_path / "plain" / "after.json").read_text())
    assert runs[0]["target_reached"] == (runs[0]["forget"]["extractable_after"] == 0
                                         and runs[0]["forget"]["verbatim_after"] == 0
                                         and after["sets"]["forget"]["loss_memorized"] == 0
                                         and after["sets"]["forget"]["loss_over_unlearned"] == 0)
    trajectories = [(tmp_path / name / "trajectory.jsonl").read_text() for name in ("plain", "flagged")]
    assert trajectories[0] == trajectories[1]
    assert folder_sha256(tmp_path / "plain" / "model") == folder_sha256(tmp_path / "flagged" / "model")
    assert runs[2]["target"] == runs[2]["settings"]["target"] == "ma"
    assert runs[2]["target_reached"] == (runs[2]["forget"]["extractable_after"] == 0
                                         and runs[2]["forget"]["verbatim_after"] == 0)
    assert ma.returncode == (0 if runs[2]["target_reached"] else 3)


@pytest.mark.parametrize("command", ["unlearn", "compare"])
def test_a_bad_target_exits_2_with_one_line(tiny, tmp_path, command):
    files = tiny["files"]
    extra = ["--methods", "sga,ga"] if command == "compare" else []
    result = run_cli(command, "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     *extra, "--target", "bogus", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--target" in lines[0] and "indistinguishable" in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_target_comes_from_the_yaml_config_and_the_flag_wins(tmp_path):
    from unmemorize.cli import unlearn_settings

    config = tmp_path / "config.yaml"
    config.write_text("target: ma\n")
    assert UnlearnSettings().target == "indistinguishable"  # the default (SPEC)
    assert unlearn_settings(None, {}).target == "indistinguishable"
    assert unlearn_settings(config, {}).target == "ma"
    assert unlearn_settings(config, {"target": "indistinguishable"}).target == "indistinguishable"
    compared = unlearn_settings(None, {"target": "indistinguishable", "method": "ga"}, compared=["ga", "sga"])
    assert compared.target == "indistinguishable"
