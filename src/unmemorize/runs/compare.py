"""Several methods on one request: each run from the same input model with the same seed, one table.

`compare` writes `<out>/runs/<name>/` (ordinary run folders), `<out>/compare.json` (the table) and, when the
report package is present, `<out>/report.html`. The demo's side-by-side is a `compare` of two runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..evaluate.suite import audit_oracle
from ..io.files import atomic_write_text
from ..io.models import Runtime, load_model
from ..io.sets import Sequence
from ..measure.audit import AuditResult
from ..measure.utility import utility_drop
from ..report.html import render_compare_report
from .config import UnlearnSettings
from .run import RunResult, unlearn


def compare(model_spec: str, sets: dict[str, list[Sequence]], general: list[Sequence],
            runs: dict[str, UnlearnSettings], runtime: Runtime, out: Path, *, before: AuditResult | None = None,
            **unlearn_options) -> list[RunResult]:
    """Run every named configuration into `<out>/runs/<name>`.

    Done once for all runs: loading the input model (each run unlearns a copy), its audit and utility before
    (the first run's serve the others), and the audit of each `--oracle`.
    """
    from accelerate import PartialState

    out = Path(out)
    if not runs:
        raise InputError("compare: no methods given")
    PartialState(cpu=runtime.device.type == "cpu")  # under torchrun: this process's device, before loading
    model, tokenizer = load_model(model_spec, runtime, **(unlearn_options.get("load_options") or {}))
    # The pristine copy waits in host memory: a run copies it to the device, so a GPU holds one model at a time.
    loaded = (model.to("cpu"), tokenizer)
    oracles: dict[tuple, AuditResult] = {}
    results: list[RunResult] = []
    for name, settings in runs.items():
        # the same input model and sets: the first run's audit and utility before serve the others
        before_utility = results[-1].run["utility"]["before"] if results and same_evaluation(settings, results[-1]) \
            else None
        oracle = settings.evaluation.oracle
        key = (oracle, json.dumps(settings.audit.model_dump(mode="json"), sort_keys=True))
        # (with --previous a run audits the earlier requests too, the oracle included: it audits its own)
        if oracle and key not in oracles and unlearn_options.get("previous") is None:
            oracles[key] = audit_oracle(oracle, sets, settings.audit, runtime, unlearn_options.get("load_options"))
        result = unlearn(model_spec, sets, general, settings, runtime, out / "runs" / name, before=before,
                         before_utility=before_utility, loaded=loaded, oracle_audit=oracles.get(key),
                         **unlearn_options)
        before = result.before
        results.append(result)
    rows = rows_of(results, list(runs))
    atomic_write_text(out / "compare.json", json.dumps({"model": model_spec, "rows": ranked(rows)}, indent=1) + "\n")
    render_compare_report(out, {name: r.out for name, r in zip(runs, results, strict=True)},
                          show_text=unlearn_options.get("show_text", False))
    return results


def same_evaluation(settings: UnlearnSettings, result: RunResult) -> bool:
    """Whether `result`'s utility before was measured as `settings` would measure it."""
    return result.run["settings"]["evaluation"] == settings.evaluation.model_dump(mode="json") and \
        result.run["settings"]["audit"] == settings.audit.model_dump(mode="json")


def rows_of(results: list[RunResult], names: list[str] | None = None) -> list[dict]:
    names = names or [r.run["method"] for r in results]
    return [comparison_row(name, r.run, r.before.summary("forget"), r.after.summary("forget"))
            for name, r in zip(names, results, strict=True)]


def comparison_row(name: str, run: dict, before: dict, after: dict) -> dict:
    u0, u1 = run["utility"]["before"], run["utility"]["after"]
    return {"run": name, "method": run["method"], "stop": run["settings"]["stop"],
            "target_reached": run["target_reached"],
            "extractable_before": before["extractable"], "extractable": after["extractable"],
            "verbatim_before": before["verbatim"], "verbatim": after["verbatim"],
            "over_unlearned": after["over_unlearned"], "forget_mean_ma": after["mean_ma"],
            "target": run.get("target", "ma"), "loss_memorized_before": before.get("loss_memorized"),
            "loss_memorized": after.get("loss_memorized"), "loss_over_unlearned": after.get("loss_over_unlearned"),
            "retain_ma_before": u0["retain_ma"], "retain_ma": u1["retain_ma"],
            "general_ppl_before": u0["general_ppl"], "general_ppl": u1["general_ppl"],
            "utility_loss": max(0.0, utility_drop(u0, u1)), "steps": run["steps"], "seconds": run["seconds"],
            "stop_reason": run["stop_reason"]}


def ranked(rows: list[dict]) -> list[dict]:
    """Best first: target reached, then fewest over-unlearned, least utility lost, fewest seconds."""
    return sorted(rows, key=lambda r: (not r["target_reached"], r["over_unlearned"], r["utility_loss"], r["seconds"]))

