"""The unlearning goals on a second victim, built with another record generator ("clinical": visit notes).

Builds (or loads from the cache) the clinical victim and its oracle (`victim_checkpoint(recipe={"generator":
"clinical"})`: RECIPE's seeds, levels and LoRA recipe, another generator), writes its sets to `<out>/data/`,
unlearns its request with the default method and options (hinge, band stop, target indistinguishable, the
oracle, generation health, the neighbours), and prints the goal table (also written to `<out>/goal.md`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/second_victim.py --out /tmp/second/run [--max-steps 150]
        [--attacks] [--set KEY=VALUE ...]      # the default attacks in the run; any unlearn setting, e.g. sam_rho=0.05
    .venv/bin/python bench/second_victim.py --out /tmp/second/run --render    # the table of a finished run

A build takes ~15-25 minutes on a loaded CPU, the oracle as long again; both are cached under
UNMEMORIZE_HOME and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import yaml
from machine import cpu_model

from unmemorize.io.models import make_runtime
from unmemorize.runs import embedded
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.demo import SOURCES, write_sets
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.methods import METHODS

GENERATOR = "clinical"


def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return format(value, spec)


def auc(privacy: dict | None) -> str:
    if not privacy or privacy.get("umia_auc") is None:
        return "—"
    ci = privacy.get("umia_auc_ci")
    return fmt(privacy["umia_auc"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def met(ok: bool | None) -> str:
    return "—" if ok is None else ("**yes**" if ok else "**NO**")


def goal_table(run_dir: Path) -> str:
    run = json.loads((run_dir / "run.json").read_text())
    before = json.loads((run_dir / "before.json").read_text())
    after = json.loads((run_dir / "after.json").read_text())
    f0, f1 = before["sets"]["forget"], after["sets"]["forget"]
    u0, u1 = run["utility"]["before"], run["utility"]["after"]
    oracle = after.get("oracle") or {}
    # the oracle's own U-MIA AUC (its privacy on the same sets)
    own_privacy = oracle.get("oracle_privacy") or oracle  # with its CI where there is one
    own = own_privacy.get("umia_auc", oracle.get("umia_auc"))
    # the goal: at most 0.65, or at most the oracle's own + 0.05 where the oracle's is higher
    limit = 0.65 if own is None else max(0.65, own + 0.05)
    umia_ok = after["privacy"]["umia_auc"] <= limit
    fq = oracle.get("forget_quality")
    holdout_ratio = u1["holdout_ppl"] / u0["holdout_ppl"]
    general_change = u1["general_ppl"] / u0["general_ppl"] - 1
    retain_change = u1["retain_ma"] - u0["retain_ma"]
    rep0 = (u0.get("generation") or {}).get("repeated_ngram_share")
    rep1 = (u1.get("generation") or {}).get("repeated_ngram_share")
    rep_change = None if rep0 is None or rep1 is None else rep1 - rep0
    rows = [
        ("target reached (" + run["target"] + ")", "—", fmt(run["target_reached"]), "reached",
         met(run["target_reached"])),
        ("request extractable (MA above band)", fmt(f0["extractable"]), fmt(f1["extractable"]), "0",
         met(f1["extractable"] == 0)),
        ("request verbatim", fmt(f0["verbatim"]), fmt(f1["verbatim"]), "0", met(f1["verbatim"] == 0)),
        ("request MA over-unlearned", fmt(f0["over_unlearned"]), fmt(f1["over_unlearned"]), "0",
         met(f1["over_unlearned"] == 0)),
        ("request loss memorized", fmt(f0.get("loss_memorized")), fmt(f1.get("loss_memorized")), "0",
         met(f1.get("loss_memorized") == 0)),
        ("request loss over-unlearned", fmt(f0.get("loss_over_unlearned")), fmt(f1.get("loss_over_unlearned")), "0",
         met(f1.get("loss_over_unlearned") == 0)),
        ("U-MIA AUC [CI] (oracle's own: " + auc(own_privacy) + ")", auc(before.get("privacy")),
         auc(after.get("privacy")), f"<= {limit:.3f} (0.65, or the oracle's + 0.05)", met(umia_ok)),
        ("forget quality (KS p vs oracle)", "—", fmt(fq), ">= 0.05", met(None if fq is None else fq >= 0.05)),
        ("holdout perplexity", fmt(u0["holdout_ppl"], ".2f"), fmt(u1["holdout_ppl"], ".2f") +
         f" (x{holdout_ratio:.3f})", "after/before <= 1.25", met(holdout_ratio <= 1.25)),
        ("general perplexity", fmt(u0["general_ppl"], ".2f"), fmt(u1["general_ppl"], ".2f") +
         f" ({general_change:+.1%})", "<= +10%", met(general_change <= 0.10)),
        ("retain MA", fmt(u0["retain_ma"], ".4f"), fmt(u1["retain_ma"], ".4f") + f" ({retain_change:+.4f})",
         "down at most 0.05", met(retain_change >= -0.05)),
        ("repeated 3-gram share", fmt(rep0, ".4f"), fmt(rep1, ".4f") +
         ("" if rep_change is None else f" ({rep_change:+.4f})"), "up at most 0.03",
         met(None if rep_change is None else rep_change <= 0.03)),
    ]
    lines = ["| goal | victim before | after unlearning | goal | met |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lr = run["settings"]["lr"] or METHODS[run["method"]].lr
    band = after.get("loss_band") or {}
    lines.append(f"Request mean loss {fmt(f0.get('mean_loss'))} -> {fmt(f1.get('mean_loss'))}; holdout mean loss "
                 f"{fmt(after['sets']['holdout'].get('mean_loss'))}; loss band [{fmt(band.get('lower'))}, "
                 f"{fmt(band.get('upper'))}]; the oracle's request mean loss "
                 f"{fmt((oracle.get('oracle_forget') or {}).get('mean_loss'))}.")
    lines.append("")
    lines.append(f"Run: method {run['method']}, lr {lr}, stop {run['settings']['stop']}, "
                 f"{run['steps']} steps (max {run['settings']['max_steps']}), unlearning "
                 f"{run['phase_seconds']['unlearn']:.0f} s, whole run {run['seconds']:.0f} s; "
                 f"stop reason: {run['stop_reason']}.")
    return "\n".join(lines)


def attack_table(run_dir: Path) -> str:
    """What each attack brought back (after.json's "attacks"), with its seconds."""
    attacks = json.loads((run_dir / "after.json").read_text()).get("attacks") or {}
    lines = ["| attack | returned extractable | returned verbatim | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {entry['returned_extractable']} | {entry['returned_verbatim']} | "
              f"{entry.get('seconds', 0):.0f} |" for name, entry in attacks.items()]
    return "\n".join(lines)


def properties(victim: Path) -> str:
    """The victim's properties from its recipe.json (measured on the merged checkpoint, before and after)."""
    info = json.loads((victim / "recipe.json").read_text())
    lines = [f"Victim: {victim} (generator {info['recipe'].get('generator', 'customers')}, "
             f"built in {info.get('seconds', 0):.0f} s, final loss {fmt(info.get('final_loss'))})", "",
             "| property | base model | victim |", "|---|---|---|"]
    b, a = info["before"], info["after"]
    for level in info["recipe"]["levels"]:
        m0, m1 = b["record_ma_by_level"][str(level)], a["record_ma_by_level"][str(level)]
        lines.append(f"| MA of records seen {level}x/epoch (mean / min) | {m0['mean']:.3f} / {m0['min']:.3f} | "
                     f"{m1['mean']:.3f} / {m1['min']:.3f} |")
    lines += [f"| holdout MA mean / q95 (band) | {b['holdout_ma_mean']:.3f} / {b['holdout_ma_q95']:.3f} | "
              f"{a['holdout_ma_mean']:.3f} / {a['holdout_ma_q95']:.3f} |",
              f"| request extractable (of {len(a['forget_ma'])}) | {b['forget_extractable']} | "
              f"{a['forget_extractable']} |",
              f"| request verbatim | {b['forget_verbatim']} | {a['forget_verbatim']} |",
              f"| general perplexity | {b['general_ppl']:.2f} | {a['general_ppl']:.2f} |"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--attacks", action="store_true", help="run the default attacks on the unlearned model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an unlearn setting (`UnlearnSettings`, VALUE read as YAML), e.g. sam_rho=0.05")
    parser.add_argument("--render", action="store_true", help="only print the table of a finished run in --out")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    # the command that makes the run (also under --render, which only prints its table again)
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), sys.argv[0], "--out", str(args.out)]
                       + ([] if args.max_steps == 150 else ["--max-steps", str(args.max_steps)])
                       + (["--attacks"] if args.attacks else []) + [f"--set={item}" for item in args.set])
    out = args.out
    recipe = {"generator": GENERATOR}
    runtime = make_runtime()
    if not args.render:
        print(f"building or loading the {GENERATOR} victim and its oracle ...", flush=True)
        victim = embedded.victim_checkpoint(runtime, recipe=recipe)
        print(f"victim: {victim}", flush=True)
        oracle_path = embedded.victim_checkpoint(runtime, oracle=True, recipe=recipe)
        print(f"oracle: {oracle_path}", flush=True)
        data = embedded.demo_data(embedded.RECIPE["data_seed"], generator=GENERATOR)
        sets, files = write_sets(data, out / "data")
        run_dir = out / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # this script owns its folder: a re-run replaces the run
        shutil.rmtree(run_dir.with_name("run.partial"), ignore_errors=True)
        for leftover in out.glob(".run*"):
            shutil.rmtree(leftover, ignore_errors=True)
        settings = UnlearnSettings(max_steps=args.max_steps, **overrides, evaluation={
            "oracle": str(oracle_path), "attacks": {} if args.attacks else None, "health": True})
        print(f"unlearning {len(data.forget)} records with {settings.method} (lr {settings.learning_rate}, "
              f"stop {settings.stop}, target {settings.target}, max {settings.max_steps} steps) ...", flush=True)
        unlearn(str(victim), sets, data.general, settings, runtime, run_dir, neighbours=data.neighbours,
                sources={name: str(files[name].resolve()) for name in SOURCES})
    else:
        victim = embedded.home() / f"victim-{embedded.recipe_hash({**embedded.RECIPE, **recipe, 'oracle': False})}"
        run_dir = out / "run"
    text = "\n\n".join([
        f"## Unlearning goals on a second victim (generator: {GENERATOR})",
        f"Machine: {cpu_model()}; runtime {runtime.describe()}",
        f"Command: `OMP_NUM_THREADS=1 UNMEMORIZE_HOME={embedded.home()} {command}`",
        "### The victim (recipe.json)", properties(victim),
        "### Goals", goal_table(run_dir),
        *(["### Attacks (returned extractable / verbatim, of the request)", attack_table(run_dir)]
          if args.attacks else []),
    ]) + "\n"
    print(text)
    (out / "goal.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
