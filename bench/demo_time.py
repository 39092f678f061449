"""Where the demo's time goes, every phase from one run: cold (empty model cache: GGUF dequantized, victim
fine-tuned, then the demo) and warm (the demo again, everything cached), against the targets of 10 and 3 min.

    .venv/bin/python bench/demo_time.py [--home DIR] [--warm-only] [--threads N]

`--home` is the model cache to use (default: a new temporary folder, so the first pass is cold); with
`--warm-only` the cache at `$UNMEMORIZE_HOME` (or ~/.cache/unmemorize) is used as it is and only the warm
pass runs. Prints one table of seconds per phase (install excluded) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model
from rich.console import Console

COLD_TARGET_S, WARM_TARGET_S = 600, 180


def timed(phases: dict[str, float], name: str, fn, *args, **kwargs):
    tick = time.perf_counter()
    value = fn(*args, **kwargs)
    phases[name] = time.perf_counter() - tick
    return value


def demo_pass(out: Path, runtime, console: Console) -> dict[str, float]:
    """Time one `unmemorize demo` (same code path as the command), then read each run's own phase times."""
    from unmemorize.runs import embedded

    phases: dict[str, float] = {}
    timed(phases, "dequantize GGUF", embedded.base_checkpoint, runtime)
    timed(phases, "victim", embedded.victim_checkpoint, runtime)
    from unmemorize.runs.demo import run_demo

    tick = time.perf_counter()
    summary = run_demo(out, runtime, console)
    total = time.perf_counter() - tick
    runs_total = 0.0
    for name, run in summary["runs"].items():
        record = json.loads((Path(run["folder"]) / "run.json").read_text())
        for phase, seconds in record["phase_seconds"].items():
            phases[f"{name}: {phase}"] = seconds
        phases[f"{name}: steps"] = record["steps"]
        runs_total += record["seconds"]
    phases["demo: audit of the victim, files, tables"] = total - runs_total
    phases["demo (after the victim)"] = total
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="keep the demo folders here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_only:
        home = args.home or Path(tempfile.mkdtemp(prefix="unmemorize-home-"))
        if home.exists() and any(home.iterdir()):
            parser.error(f"--home {home} is not empty: a cold pass needs an empty cache")
        os.environ["UNMEMORIZE_HOME"] = str(home)

    from unmemorize.io.models import make_runtime

    runtime = make_runtime()
    console = Console(stderr=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="demo-time-"))
    passes: dict[str, dict[str, float]] = {}
    wall: dict[str, float] = {}
    for name in (["warm"] if args.warm_only else ["cold", "warm"]):
        tick = time.perf_counter()
        passes[name] = demo_pass(out / name, runtime, console)
        wall[name] = time.perf_counter() - tick

    print(f"\nCPU: {cpu_model()}; torch threads {torch.get_num_threads()}; runtime {runtime.describe()}")
    names = list(passes)
    keys = list(dict.fromkeys(k for p in passes.values() for k in p))
    print("| phase | " + " | ".join(f"{n} (s)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        cells = [passes[n].get(key) for n in names]
        fmt = (lambda v: "" if v is None else f"{v:.0f}") if key.endswith("steps") else \
            (lambda v: "" if v is None else f"{v:.1f}")
        print(f"| {key} | " + " | ".join(fmt(v) for v in cells) + " |")
    print("| **total (install excluded)** | " + " | ".join(f"**{wall[n]:.0f}**" for n in names) + " |")
    for name in names:
        target = COLD_TARGET_S if name == "cold" else WARM_TARGET_S
        verdict = "met" if wall[name] <= target else f"not met, x{wall[name] / target:.2f}"
        print(f"{name}: {wall[name]:.0f} s against the target of {target} s: {verdict}")


if __name__ == "__main__":
    main()
