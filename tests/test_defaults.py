"""The defaults a user gets without asking: method `hinge` (unlearn, compare), target `indistinguishable`, and
the demo (hinge vs ga under the aggregate rule, with neighbours), on the tiny memorizing model."""

from __future__ import annotations

import json

from clirun import run_cli
from conftest import read_json

from unmemorize.io.models import make_runtime
from unmemorize.io.sets import Sequence, load_set
from unmemorize.runs.config import UnlearnSettings

FAST = ["--el-n", "0", "--prefix-tokens", "8", "--device", "cpu", "--dtype", "float32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = ["--stop", "steps", "--max-steps", "2", "--max-utility-drop", "10"]


def test_the_settings_default_to_hinge_and_indistinguishable():
    settings = UnlearnSettings()
    assert settings.method == "hinge" and settings.target == "indistinguishable"
    assert settings.stop == "band"  # unchanged


def test_the_help_names_the_defaults_the_settings_use():
    """--help and docs/cli.md say what UnlearnSettings really defaults to. The brackets are escaped in the source:
    Rich reads a bare `[default: x]` as markup and drops it from the help."""
    from pathlib import Path

    import typer

    from unmemorize.cli import app

    group = typer.main.get_command(app)
    params = {(command, param.name): param for command in ("unlearn", "compare")
              for param in group.commands[command].params}
    assert not params["compare", "methods"].required and not params["unlearn", "method"].required
    defaults = UnlearnSettings()
    reference = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()  # generated from the CLI
    assert f"* `--method <str>`: See `unmemorize methods`. [default: {defaults.method}]\n" in reference
    assert f"else {defaults.method}]\n" in reference
    assert reference.count(f"[default: {defaults.target}]\n") == 2  # unlearn and compare
    assert "[default: 200]" in reference  # the other defaults show too
    for option, key in (("--retain-weight", "retain_weight"), ("--neighbour-weight", "neighbour_weight"),
                        ("--max-steps", "max_steps")):  # each number the help states is the setting's
        lines = [line for line in reference.splitlines() if line.startswith(f"* `{option} ")]
        assert lines and all(f"[default: {getattr(defaults, key)}]" in line for line in lines), (option, lines)


def test_methods_marks_the_default():
    result = run_cli("methods", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "hinge (default)" in result.stdout and "default: hinge" in result.stdout
    assert result.stdout.count("(default)") == 1 + result.stdout.count("options (default)")


def test_unlearn_without_method_or_target_runs_hinge_to_indistinguishable(tiny, tmp_path):
    files, out = tiny["files"], tmp_path / "run"
    result = run_cli("unlearn", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--retain", files["retain"], "--general", files["retain"], *SHORT, *FAST, "--out", out,
                     env=ONE_THREAD)
    assert result.returncode in (0, 3), result.stderr
    run = read_json(out / "run.json")
    assert run["method"] == run["settings"]["method"] == "hinge"
    assert run["target"] == run["settings"]["target"] == "indistinguishable"
    assert run["steps"] == 2


def test_compare_without_methods_runs_hinge(tiny, tmp_path):
    files, out = tiny["files"], tmp_path / "cmp"
    result = run_cli("compare", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--retain", files["retain"], "--general", files["retain"], *SHORT, *FAST, "--out", out,
                     env=ONE_THREAD)
    assert result.returncode in (0, 3), result.stderr
    rows = read_json(out / "compare.json")["rows"]
    assert [(r["run"], r["method"], r["target"]) for r in rows] == [("hinge", "hinge", "indistinguishable")]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["hinge"]
    assert read_json(out / "runs" / "hinge" / "run.json")["method"] == "hinge"


def test_compare_without_methods_takes_the_config_files_method(tiny, tmp_path):
    """A --config that names a method is what compare runs when --methods is not given (checked before any model
    loads: an unknown one exits 2 naming it)."""
    config = tmp_path / "config.yaml"
    config.write_text("method: nope\n")
    files, out = tiny["files"], tmp_path / "cmp"
    result = run_cli("compare", "--model", tiny["model"], "--forget", files["forget"], "--holdout", files["holdout"],
                     "--config", config, "--out", out, env=ONE_THREAD)
    assert result.returncode == 2, result.stderr
    assert "'nope'" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


# ---- the demo, wired to the tiny model --------------------------------------------------------------------


def test_the_demo_runs_hinge_with_neighbours_and_ga_under_the_mean_rule(tiny, tmp_path, monkeypatch):
    """`unmemorize demo` with the tiny model standing in for the victim (and two steps per run): the runs are
    named hinge and ga_mean with their settings, the neighbours are written to data/ and every run records that
    file, and demo.json says so."""
    from rich.console import Console
    from tiny import sentences

    from unmemorize.runs import demo, embedded

    assert demo.DEMO_RUNS["hinge"] == {"method": "hinge", "stop": "band", "target": "indistinguishable",
                                       "max_steps": 150}  # the method's defaults: lr 3e-4, causal:6
    assert demo.DEMO_RUNS["ga_mean"]["method"] == "ga" and demo.DEMO_RUNS["ga_mean"]["stop"] == "mean"
    assert list(demo.DEMO_RUNS) == ["hinge", "ga_mean"]
    for name, options in demo.DEMO_RUNS.items():
        monkeypatch.setitem(demo.DEMO_RUNS, name, {**options, "max_steps": 2, "max_utility_drop": 10.0})
    sets = tiny["sets"]
    data = embedded.DemoData(
        forget=sets["forget"], retain=sets["retain"], holdout=sets["holdout"],
        general=[Sequence(f"g{i}", t) for i, t in enumerate(sentences(10, seed=99))],
        general_train=[Sequence(f"gt{i}", t) for i, t in enumerate(sentences(4, seed=98))],
        neighbours=[Sequence(f"n{i}", t) for i, t in enumerate(sentences(10, seed=7))])
    monkeypatch.setattr(embedded, "base_checkpoint", lambda runtime=None: tiny["model"])
    monkeypatch.setattr(embedded, "victim_checkpoint", lambda runtime=None, **kwargs: tiny["model"])
    monkeypatch.setattr(embedded, "demo_data", lambda seed=0, **kwargs: data)

    out = tmp_path / "demo"
    console = Console(width=200, record=True)
    summary = demo.run_demo(out, make_runtime("cpu", "float32"), console)

    neighbours_file = out / "data" / "neighbours.jsonl"
    assert [s.text for s in load_set(neighbours_file)] == [s.text for s in data.neighbours]
    assert summary == json.loads((out / "demo.json").read_text())
    assert summary["data"]["neighbours"] == str(neighbours_file)
    assert summary["data"]["sizes"]["neighbours"] == len(data.neighbours)
    assert list(summary["runs"]) == ["hinge", "ga_mean"]
    assert {name: (r["method"], r["stop"], r["target"]) for name, r in summary["runs"].items()} == \
        {"hinge": ("hinge", "band", "indistinguishable"), "ga_mean": ("ga", "mean", "indistinguishable")}
    for name in ("hinge", "ga_mean"):
        run = read_json(out / "runs" / name / "run.json")
        assert run["sets"]["neighbours"] == str(neighbours_file.resolve())
        assert run["sets"]["forget"] == str((out / "data" / "forget.jsonl").resolve())
        assert run["sets"]["retain"] == str((out / "data" / "retain.jsonl").resolve())
        lines = [json.loads(line) for line in (out / "runs" / name / "trajectory.jsonl").read_text().splitlines()]
        assert any("neighbour_kl" in line for line in lines)  # both runs measure how far the neighbours moved
    hinge, ga_mean = (read_json(out / "runs" / name / "run.json")["settings"] for name in ("hinge", "ga_mean"))
    assert hinge["lr"] is None and hinge["localize"] == "causal:6" and hinge["neighbour_weight"] == 3.0
    assert (out / "runs" / "hinge" / "localization.json").is_file()
    assert ga_mean["neighbour_weight"] == 0.0  # plain ga: the KL is logged, not trained on
    text = console.export_text()
    assert "hinge" in text and "ga_mean" in text and "runs/{hinge,ga_mean}/" in text
    assert all(s.text not in text for s in sets["forget"])
