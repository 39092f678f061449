"""Benchmark of the audit against the per-prefix reference (a benchmark, not a test).

On one model and one data set (default: the embedded demo victim, the demo request as forget set, the demo
holdout), in one run:

1. EL_n: `extraction_likelihoods` (divergence points + batched KV-cache decoding) against
   `reference_extraction_likelihoods` (one `generate` per prefix), float32 on CPU. Values must be identical.
   MA and verbatim are checked against their own references (one unpadded forward pass per sequence; one
   greedy `generate` from the P-token prefix per sequence).
2. MA/verbatim/MIA scores: `score_tokens` over forget + holdout against the floor, one bare batched forward
   pass over the same token batches.
3. The full `unmemorize.measure.audit.audit` of request + holdout with default settings and the 'auto' runtime.

    .venv/bin/python bench/audit_speed.py                      # the demo victim (must be built already)
    .venv/bin/python bench/audit_speed.py --model base         # the embedded base model
    .venv/bin/python bench/audit_speed.py --reference-sequences 12
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from machine import bare_forward, cpu_model  # bench/machine.py: scripts run from bench/

from unmemorize.io.models import load_model, make_runtime
from unmemorize.io.tokens import encode, pad_id_of
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.measure.extraction import divergence_points, extraction_likelihoods, reference_extraction_likelihoods
from unmemorize.measure.scoring import score_tokens
from unmemorize.runs import embedded

EL_TARGET = 20.0  # the issue: EL_n at least 20x faster than the per-prefix reference
SCORE_TARGET = 1.2  # score_tokens within 1.2x of one bare forward pass


def victim_path() -> Path:
    """Where `embedded.victim_checkpoint()` caches the victim (computed without building it)."""
    recipe = {**embedded.RECIPE, "oracle": False}
    return embedded.home() / f"victim-{embedded.recipe_hash(recipe)}"


def resolve_model(spec: str) -> Path:
    if spec == "base":
        return embedded.base_checkpoint()
    if spec == "victim":
        path = victim_path()
        if not (path / "recipe.json").is_file():
            sys.exit(f"the demo victim is not built yet ({path} has no recipe.json); build it with "
                     "unmemorize.runs.embedded.victim_checkpoint(), or pass --model base")
        return path
    return Path(spec)


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """(result of the last call, fastest of `repeats` timed calls); one untimed warm-up call when repeats > 1.

    The minimum, not the mean: on a shared machine every other process only ever adds time.
    """
    if repeats > 1:
        fn()
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def timed_pair(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Fastest time of each of two calls, run alternately (after one warm-up each) so drift hits both alike."""
    first(), second()
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], best[1]


@torch.no_grad()
def reference_ma(model, ids: list[int], runtime) -> list[bool]:
    """Teacher-forced argmax hits from one unpadded, unbatched forward pass."""
    with runtime.autocast():
        logits = model(input_ids=torch.tensor([ids], device=runtime.device)).logits[0, :-1]
    return (logits.float().argmax(-1).cpu() == torch.tensor(ids[1:])).tolist()


@torch.no_grad()
def reference_verbatim(model, ids: list[int], prefix_tokens: int, runtime) -> bool:
    """Carlini k-extractability: greedy `generate` from the P-token prefix reproduces the rest exactly."""
    from transformers import GenerationConfig

    prefix = min(prefix_tokens, len(ids) // 2)
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None,
                              max_new_tokens=len(ids) - prefix, min_new_tokens=len(ids) - prefix)
    prompt = torch.tensor([ids[:prefix]], device=runtime.device)
    with runtime.autocast():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return out[0, prefix:].tolist() == ids[prefix:]


def line(name: str, value: str) -> None:
    print(f"| {name:<62} | {value:>22} |", flush=True)


STARTED = time.perf_counter()


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="victim",
                        help="'victim' (the cached demo victim), 'base' (the embedded base) or a checkpoint folder")
    parser.add_argument("--sequences", type=int, default=None,
                        help="forget sequences measured (default: the whole demo request)")
    parser.add_argument("--holdout", type=int, default=None, help="holdout sequences (default: all)")
    parser.add_argument("--reference-sequences", type=int, default=4,
                        help="forget sequences the slow per-prefix reference runs on (0: all of --sequences)")
    parser.add_argument("--el-n", default="10", help="n of EL_n, comma-separated (default 10)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch (EL decodes 2x this, as audit)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast parts (the fastest counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-audit", action="store_true", help="skip the full-audit timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = sorted({int(n) for n in args.el_n.split(",")})

    print("# unmemorize audit speed", flush=True)
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu_model()}, {len(os.sched_getaffinity(0))} usable cores, {torch.get_num_threads()} torch "
          f"threads; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    bf16 = make_runtime("cpu", "auto").compute is not None
    print(f"bf16 autocast on CPU ('auto' runtime): {'yes' if bf16 else 'no (float32)'}")

    path = resolve_model(args.model)
    exact = make_runtime("cpu", "float32")
    model, tokenizer = load_model(path, exact)
    pad_id = pad_id_of(tokenizer)
    data = embedded.demo_data(embedded.RECIPE["data_seed"])
    forget = data.forget[: args.sequences] if args.sequences else data.forget
    holdout = data.holdout[: args.holdout] if args.holdout else data.holdout
    f_ids = encode(tokenizer, forget, args.max_tokens, "forget")
    h_ids = encode(tokenizer, holdout, args.max_tokens, "holdout")
    n_ref = args.reference_sequences or len(forget)
    n_ref = min(n_ref, len(forget))
    print(f"model: {path}")
    print(f"data: demo request ({len(forget)} forget sequences, {sum(map(len, f_ids))} tokens, "
          f"{min(map(len, f_ids))}-{max(map(len, f_ids))} per sequence) + {len(holdout)} holdout "
          f"({sum(map(len, h_ids))} tokens); EL_n for n in {ns}")
    print(flush=True)

    # ---- 1. EL_n, MA, verbatim against their references (float32) --------------------------------------
    el_batch = 2 * args.batch_size

    def ours_el(lists: list[list[int]]):
        scores = score_tokens(model, lists, exact, args.batch_size, pad_id)
        return scores, extraction_likelihoods(model, scores, ns, exact, el_batch, pad_id)

    sub = f_ids[:n_ref]
    progress("ours: EL on the reference subset")
    scores_sub = score_tokens(model, sub, exact, args.batch_size, pad_id)
    (_, el_sub), t_ours_sub = timed(lambda: ours_el(sub), args.repeats)
    _, t_el_only_sub = timed(lambda: extraction_likelihoods(model, scores_sub, ns, exact, el_batch, pad_id),
                                args.repeats)
    progress("ours: EL on every forget sequence")
    (scores_all, el_all), t_ours_all = timed(lambda: ours_el(f_ids), args.repeats)
    progress(f"reference EL on {n_ref} sequences (slow)")

    start = time.perf_counter()
    el_ref = []
    for ids in sub:
        el_ref.append(reference_extraction_likelihoods(model, ids, ns, exact))
        progress(f"  reference sequence {len(el_ref)}/{n_ref} done")
    t_ref = time.perf_counter() - start
    progress("MA and verbatim references")

    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(el_sub, el_ref, strict=True)) if a != b]
    mismatches += [(i, a, b) for i, (a, b) in enumerate(zip(el_all[:n_ref], el_ref, strict=True)) if a != b]

    start = time.perf_counter()
    ma_ref = [reference_ma(model, ids, exact) for ids in f_ids]
    verbatim_ref = [reference_verbatim(model, ids, args.prefix_tokens, exact) for ids in f_ids]
    t_mv_ref = time.perf_counter() - start
    ma_bad = [i for i, (s, r) in enumerate(zip(scores_all, ma_ref, strict=True)) if s.hits.tolist() != r]
    verbatim_bad = [i for i, (s, r) in enumerate(zip(scores_all, verbatim_ref, strict=True))
                    if s.verbatim(args.prefix_tokens) != r]

    jobs = [len(divergence_points(s, max(s.n_tokens - min(ns), 0))) for s in scores_all]
    prefixes = [max(s.n_tokens - min(ns), 0) for s in scores_all]
    ratio_same = t_ref / t_ours_sub
    ratio_extrapolated = (t_ref / n_ref * len(f_ids)) / t_ours_all

    print(f"## EL_n, MA, verbatim vs references (float32, CPU; reference on the first {n_ref} of "
          f"{len(f_ids)} forget sequences; ours: fastest of {args.repeats})")
    line("measure", "value")
    line("-" * 62, "-" * 22)
    line(f"reference_extraction_likelihoods, {n_ref} seq (1 run)", f"{t_ref:.2f} s")
    line(f"ours: score_tokens + extraction_likelihoods, {n_ref} seq", f"{t_ours_sub:.3f} s")
    line(f"ours: extraction_likelihoods alone, {n_ref} seq", f"{t_el_only_sub:.3f} s")
    line(f"speed-up, same {n_ref} sequences (target >= {EL_TARGET:.0f}x)", f"{ratio_same:.1f}x")
    line(f"ours: score_tokens + extraction_likelihoods, {len(f_ids)} seq", f"{t_ours_all:.3f} s")
    line(f"speed-up, reference extrapolated to {len(f_ids)} seq", f"{ratio_extrapolated:.1f}x")
    line("prefixes the reference decodes / divergence points we decode",
         f"{sum(prefixes[:n_ref])} / {sum(jobs[:n_ref])}")
    line(f"  same, all {len(f_ids)} sequences", f"{sum(prefixes)} / {sum(jobs)}")
    line(f"EL identical to the reference ({n_ref} seq x {len(ns)} n)", "yes" if not mismatches else "NO")
    line(f"MA hits identical to unpadded forward ({len(f_ids)} seq)", "yes" if not ma_bad else f"NO {ma_bad}")
    line(f"verbatim identical to generate from prefix ({len(f_ids)} seq)",
         "yes" if not verbatim_bad else f"NO {verbatim_bad}")
    line("MA/verbatim references time (1 run)", f"{t_mv_ref:.2f} s")
    mean_el = {str(n): statistics.mean(e[str(n)] for e in el_all if e[str(n)] is not None) for n in ns}
    line("forget mean MA / mean EL / verbatim count",
         f"{statistics.mean(s.ma for s in scores_all):.3f} / "
         + "/".join(f"{v:.3f}" for v in mean_el.values())
         + f" / {sum(s.verbatim(args.prefix_tokens) for s in scores_all)}")
    print()

    # ---- 2. scores vs the bare forward pass ---------------------------------------------------------------
    both = f_ids + h_ids
    progress("scores vs bare forward pass")
    t_floor, t_score = timed_pair(lambda: bare_forward(model, both, exact, args.batch_size, pad_id),
                                  lambda: score_tokens(model, both, exact, args.batch_size, pad_id), args.repeats)
    print(f"## MA/verbatim/MIA scores vs one bare forward pass ({len(both)} sequences, batch {args.batch_size}, "
          f"float32, fastest of {args.repeats}, run alternately)")
    line("measure", "value")
    line("-" * 62, "-" * 22)
    line("bare batched forward pass (the floor)", f"{t_floor:.3f} s")
    line("score_tokens (MA, verbatim, loss, zlib, mink, minkpp)", f"{t_score:.3f} s")
    line(f"ratio (target <= {SCORE_TARGET}x)", f"{t_score / t_floor:.2f}x")
    print()

    # ---- 3. the full audit ----------------------------------------------------------------------------------
    if not args.skip_audit:
        progress("full audit")
        # 'auto' keeps float32 weights and only adds autocast: the same loaded model serves.
        auto = make_runtime("cpu", "auto")
        sets = {"forget": forget, "holdout": holdout}
        settings = AuditSettings(max_tokens=args.max_tokens, prefix_tokens=args.prefix_tokens)
        # One timed run each (the model is warm by now): the full audit takes minutes on a small CPU.
        start = time.perf_counter()
        result = audit(model, tokenizer, sets, settings, auto)
        t_audit = time.perf_counter() - start
        progress("audit without EL")
        start = time.perf_counter()
        audit(model, tokenizer, sets, settings.model_copy(update={"el_n": []}), auto)
        t_no_el = time.perf_counter() - start
        jobs_of_set = {}
        for name in sets:
            rows = [r for r in result.sequences if r.set == name]
            jobs_of_set[name] = sum(r.n_tokens - 1 - round(r.ma * (r.n_tokens - 1)) for r in rows)
        forget_summary = result.summary("forget")
        print(f"## full audit (request + holdout, default settings, runtime {auto.describe()}, 1 run each)")
        line("measure", "value")
        line("-" * 62, "-" * 22)
        line(f"audit(), {len(forget)} forget + {len(holdout)} holdout", f"{t_audit:.2f} s")
        line("audit() with el_n=[] (no EL)", f"{t_no_el:.2f} s")
        line("EL share of the audit", f"{(t_audit - t_no_el) / t_audit:.0%}")
        line("teacher-forced misses (~ EL decode jobs): forget / holdout",
             f"{jobs_of_set['forget']} / {jobs_of_set['holdout']}")
        line("forget: extractable / verbatim / mean MA",
             f"{forget_summary['extractable']} / {forget_summary['verbatim']} / {forget_summary['mean_ma']:.3f}")
        line("holdout: mean MA", f"{result.summary('holdout')['mean_ma']:.3f}")
        print()

    ok = not mismatches and not ma_bad and not verbatim_bad
    print(f"exact: {'yes' if ok else 'NO'}; EL speed-up {ratio_same:.1f}x (target {EL_TARGET:.0f}x: "
          f"{'met' if ratio_same >= EL_TARGET else 'NOT met'}); scores {t_score / t_floor:.2f}x the forward pass "
          f"(target {SCORE_TARGET}x: {'met' if t_score / t_floor <= SCORE_TARGET else 'NOT met'})")
    if mismatches:
        for i, ours, ref in mismatches[:5]:
            print(f"  EL mismatch, sequence {i}: ours {ours} reference {ref}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
