"""The documented examples run as written: the Python API quick start and the generated CLI reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_runs_on_the_tiny_model(tiny, tmp_path):
    files = tiny["files"]
    args = [tiny["model"], files["forget"], files["holdout"], files["retain"], tmp_path / "run", "3e-4"]
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("f") and "extractable" in line for line in lines) >= 4  # f0-f3 are memorized
    assert "target reached: True" in result.stdout
    assert "quantize_8bit returned" in lines[-1]
    assert (tmp_path / "run" / "report.html").exists() and (tmp_path / "run" / "certificate.json").exists()


def test_cli_reference_is_generated_from_the_cli(tmp_path):
    """docs/cli.md must be what `make docs` writes today (regenerate it after changing an option)."""
    typer = Path(sys.executable).with_name("typer")
    generated = tmp_path / "cli.md"
    subprocess.run([str(typer), "unmemorize.cli", "utils", "docs", "--name", "unmemorize", "--output", str(generated)],
                   check=True, capture_output=True)
    assert generated.read_text() == (ROOT / "docs" / "cli.md").read_text()
