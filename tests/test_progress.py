"""Long phases show progress in a log file too (not only as a terminal bar)."""

from __future__ import annotations

import io

from rich.console import Console

from unmemorize.progress import progress


def test_log_lines_when_output_is_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with progress("building the demo victim", 3, status="loss -", console=console, every=0.0) as update:
        for step in range(3):
            update(advance=1, status=f"loss {1.5 - step:.3f}")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("building the demo victim: 0/3 · loss -")
    assert [line.split(" · ")[0] for line in lines[1:4]] == [f"building the demo victim: {n}/3" for n in (1, 2, 3)]
    assert [line.split(" · ")[1] for line in lines[1:4]] == ["loss 1.500", "loss 0.500", "loss -0.500"]
    assert len(lines) == 5 and lines[-1].startswith("building the demo victim: 3/3 · loss -0.500")
    assert lines[-1].endswith(" · done")


def test_log_lines_are_rate_limited():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with progress("unlearning", 100, console=console, every=3600.0) as update:
        for _ in range(100):
            update(advance=1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("unlearning: 0/100") and lines[1].startswith("unlearning: 100/100")


def test_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with progress("unlearning", 4, console=console) as update:
        update(advance=4)
    assert "unlearning: 0/4" not in out.getvalue()
