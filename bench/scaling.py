"""How audit time grows with the number of sequences, their length and the model size (a benchmark, not a test).

In one process, on the CPU with the 'auto' runtime (what `audit` uses by default), three things are timed at
every point:

1. the bare batched forward pass (batch 8, as the audit scores), the floor of any single-pass measure;
2. `unmemorize.measure.audit.audit` of a forget + holdout pair with default settings but EL off (`el_n=[]`);
3. the same audit with default settings, EL_10 included.

Three axes: the number of sequences (fixed length), the sequence length (fixed count), and the model size
(the embedded base SmolLM2-135M, a smaller and a larger configuration of the same architecture built with
random weights). EL decodes from every prefix where the model's guess diverges from the text, so it costs
O(count * length^2) decoded tokens on unmemorized text and is timed on smaller grids than the single-pass
parts. For every axis the exponent b of time = a * x^b is fitted by least squares on log-log.

Sequences are half Faker records (joined until long enough: the "forget" set) and half general text (the
"holdout" set) from `embedded.demo_data`, cut to exactly the length of the point by `max_tokens`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py --threads 1
    .venv/bin/python bench/scaling.py --threads 1 --counts 8,16 --el-counts 2,4 --models small,base  # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import transformers
from machine import bare_forward, cpu_model  # bench/machine.py: scripts run from bench/

from unmemorize.io.models import load_model, make_runtime
from unmemorize.io.sets import Sequence
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.extraction import divergence_points
from unmemorize.measure.scoring import score_tokens
from unmemorize.runs import embedded

EL_N = 10  # the default EL_n of AuditSettings

# Constructed configurations: the base architecture (Llama, SmolLM2 tokenizer, tied embeddings) resized.
MODEL_CONFIGS = {
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2,
              "num_hidden_layers": 10},
    "base": {},  # the embedded checkpoint itself (trained weights)
    "double": {"num_hidden_layers": 60},  # twice the base's layers
}

STARTED = time.perf_counter()


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


class Timing(NamedTuple):
    """Wall-clock seconds and CPU seconds of this process (all its threads), each the fastest of the runs.

    The minimum, not the mean: on a shared machine every other process only ever adds time. CPU time leaves
    out the time this process waited for a core while other jobs ran, so it is the steadier of the two.
    """

    wall: float
    cpu: float

    def per(self, divisor: int) -> Timing:
        return Timing(self.wall / divisor, self.cpu / divisor)


def run_timed(fn: Callable[[], object], best: Timing) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(min(best.wall, time.perf_counter() - wall), min(best.cpu, time.process_time() - cpu))


def timed(fn: Callable[[], object], repeats: int) -> Timing:
    """Fastest of `repeats` timed calls after one untimed warm-up call."""
    fn()
    best = Timing(float("inf"), float("inf"))
    for _ in range(repeats):
        best = run_timed(fn, best)
    return best


def timed_slow(fn: Callable[[], object], repeats: int, single_above: float) -> tuple[Timing, int]:
    """(fastest time, runs) of a slow call: no separate warm-up (the model and the decoding path are warm by
    then), and no repeat once a run took more than `single_above` wall seconds."""
    best, runs = Timing(float("inf"), float("inf")), 0
    while runs < repeats:
        best = run_timed(fn, best)
        runs += 1
        if best.wall > single_above:
            break
    return best, runs


def build_pool(tokenizer, count: int, min_tokens: int) -> tuple[list[Sequence], list[Sequence]]:
    """`count` record texts and `count` general texts, each at least `min_tokens` tokens long."""
    data = embedded.demo_data(embedded.RECIPE["data_seed"], holdout=max(60, 2 * count * (min_tokens // 30 + 1)))
    records = [s.text for s in data.training + data.holdout]
    general = [s.text for s in data.general + data.general_train]

    def joined(items: list[str], prefix: str) -> list[Sequence]:
        out, parts = [], []
        for text in items:
            parts.append(text)
            if len(tokenizer(" ".join(parts))["input_ids"]) >= min_tokens:
                out.append(Sequence(f"{prefix}-{len(out) + 1:03d}", " ".join(parts)))
                parts = []
                if len(out) == count:
                    return out
        raise SystemExit(f"not enough {prefix} text for {count} sequences of {min_tokens} tokens")

    return joined(records, "rec"), joined(general, "gen")


def make_model(name: str, runtime):
    """(model, tokenizer): the embedded base, or a resized random-init copy of its configuration."""
    path = embedded.base_checkpoint(runtime)
    model, tokenizer = load_model(path, runtime)
    if MODEL_CONFIGS[name]:
        config = model.config
        del model
        config = transformers.LlamaConfig.from_dict({**config.to_dict(), **MODEL_CONFIGS[name]})
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(runtime.weights).to(runtime.device).eval()
    return model, tokenizer


def params_of(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings counted once


@dataclass
class Point:
    axis: str
    model: str
    count: int
    length: int
    fast: bool  # bare forward + audit without EL
    el: bool  # audit with EL
    params: int = 0
    bare: Timing | None = None
    no_el: Timing | None = None
    with_el: Timing | None = None
    el_runs: int = 0
    jobs: int = 0
    prefixes: int = 0
    ma: float = 0.0

    @property
    def per_job(self) -> Timing | None:
        return self.with_el.per(self.jobs) if self.with_el is not None and self.jobs else None

    def x(self) -> float:
        return {"count": self.count, "length": self.length, "model": self.params}[self.axis]


def measure(point: Point, model, tokenizer, pool: tuple[list[Sequence], list[Sequence]], runtime, args,
            done: dict[tuple, Point]) -> None:
    """Time `point`; a shape already measured on the same model for another axis is reused, not re-run."""
    half = point.count // 2
    sets = {"forget": pool[0][:half], "holdout": pool[1][: point.count - half]}
    settings = AuditSettings(max_tokens=point.length, batch_size=args.batch_size)
    pad_id = pad_id_of(tokenizer)
    token_lists = [ids for seqs in sets.values() for ids in encode(tokenizer, seqs, point.length)]
    lengths = {len(ids) for ids in token_lists}
    if lengths != {point.length}:
        raise SystemExit(f"sequences are not all {point.length} tokens long: {sorted(lengths)}")
    point.params = params_of(model)
    label = f"{point.axis} axis, {point.model}, {point.count} x {point.length}"
    shape = (point.model, point.count, point.length)
    if point.fast:
        if (*shape, "fast") in done:
            same = done[(*shape, "fast")]
            point.bare, point.no_el = same.bare, same.no_el
        else:
            progress(f"{label}: bare forward, audit without EL")
            point.bare = timed(lambda: bare_forward(model, token_lists, runtime, args.batch_size, pad_id),
                               args.repeats)
            no_el = settings.model_copy(update={"el_n": []})
            point.no_el = timed(lambda: audit(model, tokenizer, sets, no_el, runtime), args.repeats)
            done[(*shape, "fast")] = point
    if point.el:
        if (*shape, "el") in done:
            same = done[(*shape, "el")]
            point.with_el, point.el_runs, point.jobs, point.prefixes, point.ma = (
                same.with_el, same.el_runs, same.jobs, same.prefixes, same.ma)
        else:
            scores = score_tokens(model, token_lists, runtime, args.batch_size, pad_id)
            point.prefixes = sum(max(s.n_tokens - EL_N, 0) for s in scores)
            point.jobs = sum(len(divergence_points(s, max(s.n_tokens - EL_N, 0))) for s in scores)
            point.ma = float(np.mean([s.ma for s in scores]))
            progress(f"{label}: audit with EL_{EL_N} ({point.jobs} decode jobs)")
            point.with_el, point.el_runs = timed_slow(lambda: audit(model, tokenizer, sets, settings, runtime),
                                                      args.el_repeats, args.el_single_above)
            done[(*shape, "el")] = point
    progress(f"{label}: bare {seconds(point.bare)}, no EL {seconds(point.no_el)}, EL {seconds(point.with_el)}")


def exponent(points: list[Point], attr: str, kind: str, last: int = 0) -> tuple[float, int] | None:
    """(b of time = a * x^b by least squares on log-log, points used) over the points that have `attr`
    (`kind`: 'wall' or 'cpu'); `last`: only the `last` largest x."""
    usable = sorted((p.x(), getattr(getattr(p, attr), kind)) for p in points if getattr(p, attr) is not None)
    usable = usable[-last:] if last else usable
    if len(usable) < 2:
        return None
    xs, ts = np.log([u[0] for u in usable]), np.log([u[1] for u in usable])
    return float(np.polyfit(xs, ts, 1)[0]), len(usable)


def seconds(value: Timing | None) -> str:
    return "—" if value is None else f"{value.wall:.2f} / {value.cpu:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="8,16,32,64", help="sequence counts, single-pass parts")
    parser.add_argument("--count-length", type=int, default=64, help="tokens per sequence on the count axis")
    parser.add_argument("--el-counts", default="2,4,8,16,32,64", help="sequence counts, audit with EL")
    parser.add_argument("--el-count-length", type=int, default=32, help="tokens per sequence, EL count axis")
    parser.add_argument("--lengths", default="32,64,128,256", help="tokens per sequence, single-pass parts")
    parser.add_argument("--length-count", type=int, default=8, help="sequences on the length axis")
    parser.add_argument("--el-lengths", default="32,64,96,128", help="tokens per sequence, audit with EL")
    parser.add_argument("--el-length-count", type=int, default=2, help="sequences on the EL length axis")
    parser.add_argument("--models", default="small,base,double", help=f"of {', '.join(MODEL_CONFIGS)}")
    parser.add_argument("--model-shape", default="8x64", help="count x length of the model axis, single-pass")
    parser.add_argument("--el-model-shape", default="2x32", help="count x length of the model axis, with EL")
    parser.add_argument("--batch-size", type=int, default=8, help="the audit's batch (EL decodes 2x this)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after a warm-up (fastest counts)")
    parser.add_argument("--el-repeats", type=int, default=2, help="timed runs of an audit with EL (fastest counts)")
    parser.add_argument("--el-single-above", type=float, default=60.0,
                        help="an audit with EL that took longer than this (s) is not repeated")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "base" not in models or any(m not in MODEL_CONFIGS for m in models):
        parser.error(f"--models must include base and name only {', '.join(MODEL_CONFIGS)}")
    model_shape = tuple(int(v) for v in args.model_shape.split("x"))
    el_model_shape = tuple(int(v) for v in args.el_model_shape.split("x"))

    # The points, base model first (one model in memory at a time).
    points: list[Point] = []

    def add(axis: str, model: str, count: int, length: int, fast: bool, el: bool) -> None:
        for p in points:
            if (p.axis, p.model, p.count, p.length) == (axis, model, count, length):
                p.fast, p.el = p.fast or fast, p.el or el
                return
        points.append(Point(axis, model, count, length, fast, el))

    for count in ints(args.counts):
        add("count", "base", count, args.count_length, True, False)
    for count in ints(args.el_counts):
        add("count", "base", count, args.el_count_length, False, True)
    for length in ints(args.lengths):
        add("length", "base", args.length_count, length, True, False)
    for length in ints(args.el_lengths):
        add("length", "base", args.el_length_count, length, False, True)
    for name in models:
        add("model", name, *model_shape, True, False)
        add("model", name, *el_model_shape, False, True)

    runtime = make_runtime("cpu", "auto")
    load_before = load_average()
    print("# unmemorize audit scaling", flush=True)
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, {torch.get_num_threads()} torch "
          f"threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {platform.platform()}; "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"runtime: {runtime.describe()}; audit batch {args.batch_size} (EL decodes {2 * args.batch_size} "
          f"prompts at a time); EL_{EL_N}")
    print(f"timing: single-pass parts fastest of {args.repeats} after a warm-up; audits with EL fastest of "
          f"{args.el_repeats} (1 run when a run took over {args.el_single_above:.0f} s), after one warm-up audit "
          "per model; a shape shared by two axes is measured once")
    print(f"load average (1, 5, 15 min) at start: {load_before}")
    print(flush=True)

    need_count = max(p.count for p in points)
    need_length = max(p.length for p in points)
    pool: tuple[list[Sequence], list[Sequence]] | None = None
    done: dict[tuple, Point] = {}
    order = ["base"] + [m for m in models if m != "base"]
    for name in order:
        progress(f"model {name}: loading / building")
        model, tokenizer = make_model(name, runtime)
        if pool is None:
            pool = build_pool(tokenizer, (need_count + 1) // 2, need_length)
        # Warm-up: one small audit with EL, so the first timed decode pays no one-off costs.
        audit(model, tokenizer, {"forget": pool[0][:1], "holdout": pool[1][:1]}, AuditSettings(max_tokens=24),
              runtime)
        for point in points:
            if point.model == name:
                measure(point, model, tokenizer, pool, runtime, args, done)
        del model

    load_after = load_average()
    params = {p.model: p.params for p in points}
    columns = [("axis", 6), ("model", 6), ("params", 6), ("sequences x tokens", 18), ("bare forward", 15),
               ("audit, no EL", 15), (f"audit, EL_{EL_N}", 15), ("EL runs", 7), ("decode jobs / prefixes", 22),
               ("mean MA", 7)]
    print("## Times (seconds, wall / CPU; fastest of the runs; — : not measured at this point)")
    print("| " + " | ".join(f"{name:<{width}}" for name, width in columns) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")
    for p in points:
        el_cells = (f"{p.el_runs}", f"{p.jobs} / {p.prefixes}", f"{p.ma:.2f}") if p.el else ("—", "—", "—")
        print(f"| {p.axis:<6} | {p.model:<6} | {p.params / 1e6:5.1f}M | {p.count:>8} x {p.length:<7} "
              f"| {seconds(p.bare):>15} | {seconds(p.no_el):>15} | {seconds(p.with_el):>15} | {el_cells[0]:>7} "
              f"| {el_cells[1]:>22} | {el_cells[2]:>7} |")
    print()

    print("## Exponents b of time = a * x^b (least squares on log-log of wall / CPU time; n = points fitted)")
    columns = [("axis (x)", 28), ("points", 11), ("bare forward", 18), ("audit, no EL", 18),
               (f"audit, EL_{EL_N}", 18), ("EL per decode job", 20)]
    print("| " + " | ".join(f"{name:<{width}}" for name, width in columns) + " |")
    print("|" + "|".join("-" * (width + 2) for _, width in columns) + "|")
    for axis, label in (("count", "sequences"), ("length", "tokens per sequence"), ("model", "parameters")):
        group = [p for p in points if p.axis == axis]
        for last, which in ((0, "all"), (2, "largest two")):
            cells = []
            for attr in ("bare", "no_el", "with_el", "per_job"):
                fits = [exponent(group, attr, kind, last) for kind in ("wall", "cpu")]
                cells.append("—" if fits[0] is None else f"{fits[0][0]:.2f} / {fits[1][0]:.2f} (n={fits[0][1]})")
            print(f"| {f'{axis} ({label})':<28} | {which:<11} | {cells[0]:>18} | {cells[1]:>18} | {cells[2]:>18} "
                  f"| {cells[3]:>20} |")
    print()
    print("models: " + "; ".join(
        f"{name} {params[name] / 1e6:.1f}M parameters "
        + ("(the embedded SmolLM2-135M, trained)" if not MODEL_CONFIGS[name] else
           "(random init: " + ", ".join(f"{k}={v}" for k, v in MODEL_CONFIGS[name].items()) + ")")
        for name in order))
    print(f"load average (1, 5, 15 min) at end: {load_after}; total wall time {time.perf_counter() - STARTED:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
