"""The Python API end to end: audit a request, unlearn it with `sga`, attack the result.

    python examples/quickstart.py MODEL FORGET HOLDOUT RETAIN OUT [LR]

MODEL is a Hugging Face folder (or hub id, or .gguf); FORGET, HOLDOUT, RETAIN are set files (JSONL, CSV,
Parquet, .txt); OUT is a new folder for the run; LR the learning rate (default 2e-5, right for the demo's
135M model; a tiny model needs more). With the demo's files:

    python examples/quickstart.py ~/.cache/unmemorize/victim-* unmemorize-demo/data/{forget,holdout,retain}.jsonl run/
"""

import sys
from pathlib import Path

from unmemorize import (
    AttackSettings,
    AuditSettings,
    UnlearnSettings,
    audit,
    load_model,
    load_set,
    make_runtime,
    run_attacks,
    unlearn,
)
from unmemorize.runs.embedded import default_general


def main(model_path: str, forget: str, holdout: str, retain: str, out: str, lr: str = "2e-5") -> None:
    runtime = make_runtime()  # auto: the GPU if there is one, bf16 autocast where it is fast
    sets = {"forget": load_set(forget), "holdout": load_set(holdout), "retain": load_set(retain)}
    settings = AuditSettings(el_n=[])  # EL off for speed; MA, verbatim and the MIA scores remain

    # 1. Which requested sequences does the model still give away?
    model, tokenizer = load_model(model_path, runtime)
    before = audit(model, tokenizer, sets, settings, runtime)
    for row in before.of("forget"):
        print(f"{row.id} {row.hash} MA {row.ma:.2f} {row.status}{' verbatim' if row.verbatim else ''}")

    # 2. Unlearn them, sequence by sequence, until none is above the band (writes OUT/: model, audits, report).
    #    The paper's method and target; `UnlearnSettings()` is the recommended `hinge` toward `indistinguishable`
    #    (MA and loss both in the band), which wants its `neighbours=` set (README).
    unlearn_settings = UnlearnSettings(method="sga", target="ma", retain_loss="nll", lr=float(lr), audit=settings)
    run = unlearn(model_path, sets, default_general(), unlearn_settings, runtime, Path(out))
    print(f"target reached: {run.target_reached} after {run.run['steps']} steps ({run.run['stop_reason']})")

    # 3. Does anything come back under attack?
    unlearned, tokenizer = load_model(Path(out) / "model", runtime)
    attacks = run_attacks(unlearned, tokenizer, sets, settings, runtime, AttackSettings(attacks=["quantize_8bit"]))
    print(f"quantize_8bit returned {attacks['quantize_8bit']['returned_extractable']} sequence(s) to extractable")


if __name__ == "__main__":
    main(*sys.argv[1:7])
