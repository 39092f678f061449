"""Every unlearning method on the demo victim and the demo request: steps and seconds to target (or why not),
what is left extractable / verbatim / over-unlearned, and utility after (retain MA, general perplexity).

    .venv/bin/python bench/methods.py [--methods sga,ga,...] [--max-steps 150] [--out bench-out/]

Prints a Markdown table (paste it into docs/methods.md with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from unmemorize.io.models import load_model, make_runtime, state_sha256
from unmemorize.measure.audit import AuditSettings, audit
from unmemorize.runs import embedded
from unmemorize.runs.config import UnlearnSettings
from unmemorize.runs.demo import RETAIN_GENERAL_CHUNKS
from unmemorize.runs.run import unlearn
from unmemorize.unlearning.methods import METHODS

# Per-method options beyond the defaults (the defaults are each method's own learning rate).
OVERRIDES: dict[str, dict] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--extra", default="{}", help="JSON of settings applied to every method")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--retain-general", type=int, default=RETAIN_GENERAL_CHUNKS,
                        help="documentation chunks of the victim's training data added to the retain set (as the demo)")
    args = parser.parse_args()

    runtime = make_runtime("cpu", args.dtype)
    victim = embedded.victim_checkpoint(runtime)
    data = embedded.demo_data(embedded.RECIPE["data_seed"])
    sets = {"forget": data.forget, "holdout": data.holdout,
            "retain": data.retain + data.general_train[: args.retain_general]}
    audit_settings = AuditSettings(el_n=[])  # EL does not decide anything here; the final audit is what counts
    model, tokenizer = load_model(victim, runtime)
    before = audit(model, tokenizer, sets, audit_settings, runtime,
                   model_info={"source": str(victim), "sha256": state_sha256(model)})
    del model
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, runtime {runtime.describe()}")
    print(f"# victim: {victim}; request {len(data.forget)} records, retain {len(data.retain)}, "
          f"holdout {len(data.holdout)}; retain +{args.retain_general} doc chunks; max steps {args.max_steps}; "
          f"extra {args.extra}")
    f = before.summary("forget")
    print(f"# before: extractable {f['extractable']}/{f['n']}, verbatim {f['verbatim']}\n")
    print("| method | target | steps | unlearn s | extractable | verbatim | over-unlearned | retain MA | general ppl |"
          " holdout ppl | loss AUC | umia | stop reason |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-methods-"))
    before_utility = None
    for name in args.methods.split(","):
        options = {"method": name, "max_steps": args.max_steps, **OVERRIDES.get(name, {}), **json.loads(args.extra)}
        # generation health is the same before for every method and tells little here: measured by the demo
        settings = UnlearnSettings(**options, audit=audit_settings, evaluation={"health": False})
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        result = unlearn(str(victim), sets, data.general, settings, runtime, out, before=before,
                         before_utility=before_utility)
        before_utility = result.run["utility"]["before"]  # the same input model: measured once
        after = result.after.summary("forget")
        u0, u1 = result.run["utility"]["before"], result.run["utility"]["after"]
        privacy = result.after.privacy
        print(f"| {name} | {'yes' if result.target_reached else 'no'} | {result.run['steps']} | "
              f"{result.run['phase_seconds']['unlearn']:.0f} | {after['extractable']} | {after['verbatim']} | "
              f"{after['over_unlearned']} | {u0['retain_ma']:.3f} → {u1['retain_ma']:.3f} | "
              f"{u0['general_ppl']:.2f} → {u1['general_ppl']:.2f} ({u1['general_ppl'] / u0['general_ppl'] - 1:+.0%}) | "
              f"{u0['holdout_ppl']:.1f} → {u1['holdout_ppl']:.1f} | {privacy['loss_auc']:.2f} | "
              f"{privacy['umia_auc']:.2f} | {result.run['stop_reason']} |", flush=True)
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

if __name__ == "__main__":
    main()
