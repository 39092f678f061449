"""Progress of long phases (the victim build, unlearning, a scan), on a terminal and in a log file alike.

On a terminal: a Rich progress bar, removed when the phase ends. Otherwise (`make demo > log`, CI, a pipe):
a plain line when the phase starts, then at most one every `every` seconds, and one when it ends, so a log
shows that a 30-minute build is alive and how far it got.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_EVERY_S = 30.0


@contextlib.contextmanager
def progress(description: str, total: int | None, *, status: str = "", enabled: bool = True,
             console: Console | None = None, every: float = LOG_EVERY_S) -> Iterator[Callable[..., None]]:
    """Yield `update(completed=None, advance=0, status=None)` for a phase of `total` units (None: unknown)."""
    if not enabled:
        yield lambda **_: None
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total, status=status)

            def update(completed: int | None = None, advance: int = 0, status: str | None = None) -> None:
                fields = {} if status is None else {"status": status}
                bar.update(task, completed=completed, advance=advance, **fields)

            yield update
        return

    started = time.perf_counter()
    state = {"done": 0, "status": status, "logged": started}

    def line(final: bool = False) -> None:
        seconds = time.perf_counter() - started
        count = f"{state['done']}/{total}" if total is not None else f"{state['done']}"
        tail = f" · {state['status']}" if state["status"] else ""
        console.print(f"{description}: {count}{tail} · {seconds:.0f} s{' · done' if final else ''}",
                      highlight=False, soft_wrap=True)

    def update(completed: int | None = None, advance: int = 0, status: str | None = None) -> None:
        state["done"] = completed if completed is not None else state["done"] + advance
        if status is not None:
            state["status"] = status
        if time.perf_counter() - state["logged"] >= every:
            state["logged"] = time.perf_counter()
            line()

    line()
    yield update
    line(final=True)
