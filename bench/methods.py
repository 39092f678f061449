"""Every unlearning method on the demo victim and the demo request, over a grid of learning rates: whether the
target was reached (steps, seconds, why it stopped), what is left (extractable, verbatim, over-unlearned, the
loss statuses), privacy (U-MIA AUC, forget quality against the oracle) and utility before -> after.

    .venv/bin/python bench/methods.py [--methods sga,ga,...] [--max-steps 60] [--lrs 0.3,1,3]
        [--target indistinguishable] [--no-oracle] [--no-neighbours] [--extra JSON] [--out DIR] [--quick]
        [--attacks]
    .venv/bin/python bench/methods.py --render DIR/grid.jsonl

`--lrs` are multiples of each method's own default learning rate. Each row is printed as soon as it is
measured; with `--out` the run folders and `<out>/grid.jsonl` (one JSON line per row) are kept, and `--render`
prints the tables again from that file. `--attacks` runs the default attacks (`unmemorize attacks`) on every
unlearned model and adds a table of what each brings back (issue 13). Paste the tables into docs/methods.md
with the command and the machine.

Best lr per method: among a method's rows, target reached first; then the fewest blocking sequences
(extractable + verbatim + loss memorized + loss over-unlearned); then the U-MIA AUC closest to 0.5; then the
smallest utility drop (retain MA before minus after).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from machine import cpu_model

from unmemorize.evaluate.suite import audit_oracle
from unmemorize.io.models import load_model, make_runtime, state_sha256
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.runs import embedded
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.demo import RETAIN_GENERAL_CHUNKS
from unmemorize.runs.run import RunResult, unlearn
from unmemorize.unlearning.methods import METHODS

COLUMNS = ["method", "lr", "target", "steps", "unlearn s", "extractable", "verbatim", "MA over-unlearned",
           "loss mem/band/over", "umia [CI]", "forget quality", "retain MA", "general ppl", "holdout ppl",
           "rep. 3-grams", "stop reason"]
QUICK = {"holdout": 20, "retain": 12, "retain_general": 8, "general": 16, "neighbours": 12}


def row_of(name: str, multiple: float, result: RunResult) -> dict:
    """What the tables show of one run (and grid.jsonl keeps)."""
    run, after = result.run, result.after.summary("forget")
    u0, u1 = run["utility"]["before"], run["utility"]["after"]
    privacy, oracle = result.after.privacy, result.after.extra.get("oracle")
    return {"method": name, "lr": run["settings"]["lr"], "multiple": multiple, "target": run["target"],
            "target_reached": run["target_reached"], "steps": run["steps"],
            "unlearn_s": run["phase_seconds"]["unlearn"],
            **{k: after[k] for k in ("extractable", "verbatim", "over_unlearned", "loss_memorized", "loss_in_band",
                                     "loss_over_unlearned")},
            "umia_auc": privacy.get("umia_auc"), "umia_auc_ci": privacy.get("umia_auc_ci"),
            "forget_quality": oracle["forget_quality"] if oracle else None,
            **{k: [u0.get(k), u1.get(k)] for k in ("retain_ma", "general_ppl", "holdout_ppl")},
            "repeated_3gram": [(u.get("generation") or {}).get("repeated_ngram_share") for u in (u0, u1)],
            "stop_reason": run["stop_reason"], "out": str(result.out),
            # returned extractable / verbatim, and with the oracle (the default) those beyond what it shows
            "attacks": {attack: [entry["returned_extractable"], entry["returned_verbatim"],
                                 *([entry["beyond_oracle_extractable"], entry["beyond_oracle_verbatim"]]
                                   if "oracle" in entry else [])]
                        for attack, entry in (result.after.extra.get("attacks") or {}).items()}}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def arrow(pair: list, spec: str) -> str:
    return f"{fmt(pair[0], spec)} → {fmt(pair[1], spec)}"


def change(pair: list, kind: str) -> str:
    """ " (+12%)" or " (×3.4)" after a before → after pair; empty when either is missing."""
    if None in pair or not pair[0]:
        return ""
    ratio = pair[1] / pair[0]
    return f" ({ratio - 1:+.1%})" if kind == "%" else f" (×{ratio:.1f})"


def umia(row: dict) -> str:
    ci = row.get("umia_auc_ci")
    return fmt(row.get("umia_auc"), ".2f") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def grid_line(row: dict) -> str:
    """One Markdown row of the grid (or of the best-lr table)."""
    lr = f"{row['lr']:.0e} (×{row['multiple']:g})"
    if "error" in row:
        return f"| {row['method']} | {lr} | error: {row['error']} |" + " |" * (len(COLUMNS) - 3)
    cells = [row["method"], lr, "yes" if row["target_reached"] else "no", row["steps"], f"{row['unlearn_s']:.0f}",
             row["extractable"], row["verbatim"], row["over_unlearned"],
             f"{row['loss_memorized']}/{row['loss_in_band']}/{row['loss_over_unlearned']}", umia(row),
             fmt(row["forget_quality"], ".2g"), arrow(row["retain_ma"], ".3f"),
             arrow(row["general_ppl"], ".2f") + change(row["general_ppl"], "%"),
             arrow(row["holdout_ppl"], ".1f") + change(row["holdout_ppl"], "×"),
             arrow(row["repeated_3gram"], ".2f"), row["stop_reason"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|"


def selection_key(row: dict) -> tuple:
    """The best-lr rule of the module docstring, as a sort key (smallest is best)."""
    blocking = row["extractable"] + row["verbatim"] + row["loss_memorized"] + row["loss_over_unlearned"]
    auc = row["umia_auc"]
    retain = row["retain_ma"]
    return (not row["target_reached"], blocking, abs(auc - 0.5) if auc is not None else 1.0,
            retain[0] - retain[1] if None not in retain else 1.0)


def best_rows(rows: list[dict]) -> list[dict]:
    """One row per method (in the order met), the best lr of its measured rows."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            by_method.setdefault(row["method"], []).append(row)
    return [min(candidates, key=selection_key) for candidates in by_method.values()]


def print_best(rows: list[dict]) -> None:
    print("\n## Best lr per method\n\n" + table_head())
    for row in best_rows(rows):
        print(grid_line(row))


def print_attacks(rows: list[dict]) -> None:
    """Per run, what each attack brought back: returned extractable / returned verbatim, and after a colon the
    same counts beyond what the attack shows on the oracle (when the oracle was attacked too)."""
    attacked = [row for row in rows if row.get("attacks")]
    if not attacked:
        return
    names = list(dict.fromkeys(name for row in attacked for name in row["attacks"]))
    print("\n## Attacks (returned extractable / verbatim : beyond the oracle)\n\n| method | lr | "
          + " | ".join(names) + " |\n" + "|---" * (len(names) + 2) + "|")

    def cell(counts: list[int]) -> str:
        return "/".join(map(str, counts[:2])) + (":" + "/".join(map(str, counts[2:])) if counts[2:] else "")

    for row in attacked:
        cells = [cell(row["attacks"][n]) if n in row["attacks"] else "-" for n in names]
        print(f"| {row['method']} | {row['lr']:.0e} (×{row['multiple']:g}) | " + " | ".join(cells) + " |")


def render(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        if "header" in record:
            print(record["header"])
    rows = [r for r in records if "method" in r]
    print("\n## Grid\n\n" + table_head())
    for row in rows:
        print(grid_line(row))
    print_best(rows)
    print_attacks(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--lrs", default="0.3,1,3", help="multiples of each method's default learning rate")
    parser.add_argument("--target", default="indistinguishable", choices=["ma", "indistinguishable"])
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                        help="forget quality against the victim retrained without the request")
    parser.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=True,
                        help="keep unseen in-domain records as they were (KL to the victim)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--extra", default="{}", help="JSON of settings applied to every run (not lr)")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders and grid.jsonl here")
    parser.add_argument("--retain-general", type=int, default=RETAIN_GENERAL_CHUNKS,
                        help="documentation chunks of the victim's training data added to the retain set (as the demo)")
    parser.add_argument("--attacks", action="store_true", help="run the default attacks on every unlearned model "
                        "(`unmemorize attacks`) and print what each brings back")
    parser.add_argument("--quick", action="store_true", help="smoke test: small sets, 2 steps, lr ×1 only")
    parser.add_argument("--render", type=Path, default=None, help="print the tables of a grid.jsonl and exit")
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    unknown = [name for name in args.methods.split(",") if name not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.quick:
        args.max_steps, args.lrs = 2, "1"
        args.retain_general = min(args.retain_general, QUICK["retain_general"])
    cut = (lambda seqs, name: seqs[: QUICK[name]]) if args.quick else (lambda seqs, name: seqs)

    runtime = make_runtime("cpu", args.dtype)
    victim = embedded.victim_checkpoint(runtime)
    oracle = str(embedded.victim_checkpoint(runtime, oracle=True)) if args.oracle else None
    data = embedded.demo_data(embedded.RECIPE["data_seed"])
    sets = {"forget": data.forget, "holdout": cut(data.holdout, "holdout"),
            "retain": cut(data.retain, "retain") + data.general_train[: args.retain_general]}
    general = cut(data.general, "general")
    neighbours = cut(list(data.neighbours), "neighbours") if args.neighbours else None
    audit_settings = AuditSettings(el_n=[])  # EL does not decide anything here; the final audit is what counts
    model, tokenizer = load_model(victim, runtime)
    before = audit(model, tokenizer, sets, audit_settings, runtime,
                   model_info={"source": str(victim), "sha256": state_sha256(model)})
    loaded = (model.to("cpu"), tokenizer)  # each run unlearns a copy
    # Audited once like compare does: every run compares its forget losses with these.
    oracle_audit = audit_oracle(oracle, sets, audit_settings, runtime) if oracle else None
    f = before.summary("forget")
    header = [f"# machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"runtime {runtime.describe()}",
              f"# victim: {victim}; oracle: {oracle or 'none'}",
              f"# sets: request {len(data.forget)}, retain {len(sets['retain'])} (of them "
              f"{args.retain_general} doc chunks), holdout {len(sets['holdout'])}, general {len(general)}, "
              f"neighbours {len(neighbours) if neighbours else 0}{' (--quick)' if args.quick else ''}",
              f"# target {args.target}; max steps {args.max_steps}; lr × {args.lrs}; extra {args.extra}"
              f"{'; attacks (defaults)' if args.attacks else ''}",
              f"# before: extractable {f['extractable']}/{f['n']}, verbatim {f['verbatim']}, "
              f"loss memorized {f['loss_memorized']}, umia {before.privacy.get('umia_auc', float('nan')):.2f}"]
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    root.mkdir(parents=True, exist_ok=True)
    grid = (root / "grid.jsonl").open("w") if args.out else None

    def record(entry: dict) -> None:
        if grid:
            grid.write(json.dumps(entry) + "\n")
            grid.flush()

    for line in header:
        print(line)
        record({"header": line})
    print("\n## Grid\n\n" + table_head(), flush=True)
    rows: list[dict] = []
    before_utility = None
    evaluation = {"oracle": oracle, "attacks": {} if args.attacks else None, "health": True}
    for name in args.methods.split(","):
        for multiple in (float(m) for m in args.lrs.split(",")):
            lr = METHODS[name].lr * multiple
            options = {"method": name, "max_steps": args.max_steps, "target": args.target,
                       "audit": audit_settings, "evaluation": evaluation, **json.loads(args.extra), "lr": lr}
            out = root / f"{name}-x{multiple:g}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            try:
                result = unlearn(str(victim), sets, general, UnlearnSettings(**options), runtime, out,
                                 before=before, before_utility=before_utility, loaded=loaded,
                                 oracle_audit=oracle_audit, neighbours=neighbours)
            except Exception as error:  # one failing run must not end a grid of hours
                message = " ".join(f"{type(error).__name__}: {error}".replace("|", "/").split())
                row = {"method": name, "lr": lr, "multiple": multiple, "error": message}
            else:
                before_utility = result.run["utility"]["before"]  # the same input model: measured once
                row = row_of(name, multiple, result)
            rows.append(row)
            record(row)
            print(grid_line(row), flush=True)
            if args.out is None:
                shutil.rmtree(out, ignore_errors=True)
    print_best(rows)
    print_attacks(rows)
    if grid:
        grid.close()


if __name__ == "__main__":
    main()
