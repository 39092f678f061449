"""report.html: one self-contained page per run folder, and one comparing several runs.

Everything the page shows is read back from the files of the run folder (run.json, before.json,
after.json, trajectory.jsonl), so `unmemorize report RUN_DIR` re-renders any finished run, including runs
made by older versions that lack some keys. Sequences appear by id and short hash; their text only with
`show_text`, and only when the audit files hold it (runs made with --show-text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .._version import __version__
from ..errors import InputError
from ..io.files import atomic_write_text
from . import plots

REPORT = "report.html"
TEMPLATES = Path(__file__).parent / "templates"
STATUSES = ("extractable", "in_band", "over_unlearned")
AUC_NAMES = ("loss", "zlib", "mink", "minkpp", "ref", "umia")
AUC_HELP = {"loss": "lower loss = member", "zlib": "loss / zlib length", "mink": "Min-K% Prob",
            "minkpp": "Min-K%++", "ref": "loss minus the original model's loss",
            "umia": "max(AUC, 1 − AUC) of loss: flags unlearning that stands out too"}
# Files of a run folder worth linking from its report, in reading order.
RUN_FILES = ("run.json", "before.json", "after.json", "before.csv", "after.csv", "trajectory.jsonl",
             "localization.json", "ledger.json", "certificate.json")


@dataclass
class RunFolder:
    """A finished unlearn run folder, as read from disk."""

    path: Path
    run: dict
    before: dict
    after: dict
    trajectory: list[dict]
    localization: dict | None = None  # localization.json: causal tracing of --localize (None without it)

    @property
    def forget_before(self) -> dict:
        return self.before.get("sets", {}).get("forget", {})

    @property
    def forget_after(self) -> dict:
        return self.after.get("sets", {}).get("forget", {})


# ---- public API -----------------------------------------------------------------------------------------


def render_run_report(run_dir: Path, show_text: bool = False) -> Path:
    """Write `run_dir/report.html` (atomically) from the run folder's files; return its path."""
    folder = read_run(Path(run_dir))
    html = environment().get_template("report.html.j2").render(page="run", **run_context(folder, show_text))
    path = folder.path / REPORT
    atomic_write_text(path, html)
    return path


def render_compare_report(out_dir: Path, run_dirs: dict[str, Path], show_text: bool = False) -> Path:
    """Write `out_dir/report.html`: a sortable table of the runs, the trade-off, and a section per run linking
    to its own report (rendered first where a run folder has none yet). Returns its path."""
    if not run_dirs:
        raise InputError("compare report: no runs to compare")
    out_dir = Path(out_dir)
    runs = {name: read_run(Path(path)) for name, path in run_dirs.items()}
    for folder in runs.values():
        if not (folder.path / REPORT).exists():
            render_run_report(folder.path, show_text)
    html = environment().get_template("report.html.j2").render(page="compare", **compare_context(out_dir, runs))
    path = out_dir / REPORT
    atomic_write_text(path, html)
    return path


# ---- reading a run folder -------------------------------------------------------------------------------


def read_run(run_dir: Path) -> RunFolder:
    for name in ("run.json", "before.json", "after.json"):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir}: not a finished unlearn run folder (no {name})")
    return RunFolder(path=run_dir, run=read_json(run_dir / "run.json"), before=read_json(run_dir / "before.json"),
                     after=read_json(run_dir / "after.json"), trajectory=read_trajectory(run_dir / "trajectory.jsonl"),
                     localization=read_json(run_dir / "localization.json")
                     if (run_dir / "localization.json").is_file() else None)


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object")
    return value


def read_trajectory(path: Path) -> list[dict]:
    """The trajectory lines, by step; none for methods without gradient steps (ta, tau) or old runs."""
    if not path.is_file():
        return []
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
    return sorted(lines, key=lambda item: item.get("step", 0))


# ---- the run page ---------------------------------------------------------------------------------------


def run_context(folder: RunFolder, show_text: bool) -> dict:
    run, before, after = folder.run, folder.before, folder.after
    sequences = sequence_rows(before, after, show_text)
    text_held = any("text" in s for s in before.get("sequences", []) + after.get("sequences", []))
    return {
        "title": f"Unlearning report: {run.get('method', 'run')}",
        "version": __version__,
        "header": run_header(folder),
        "cards": summary_cards(folder),
        "utility": utility_rows(run.get("utility", {})),
        "privacy": privacy_rows(before.get("privacy", {}), after.get("privacy", {})),
        "bands": {"before": before.get("band"), "after": after.get("band")},
        "loss_bands": {"before": before.get("loss_band"), "after": after.get("loss_band")},
        "sets": set_rows(before.get("sets", {}), after.get("sets", {})),
        "earlier": earlier_summary(run.get("earlier")),
        "plots": run_plots(folder, sequences),
        "attacks": attack_section(after.get("attacks"), sequences),
        "oracle": oracle_section(before.get("oracle"), after.get("oracle")),
        "localization": localization_summary(folder.localization),
        "sequences": sequences,
        "el_key": el_key(before),
        "show_text": show_text and text_held,
        "text_missing": show_text and not text_held,
        "files": [name for name in RUN_FILES if (folder.path / name).exists()],
        "settings_json": json.dumps(run.get("settings", {}), indent=1, sort_keys=True),
    }


def run_header(folder: RunFolder) -> list[tuple[str, str]]:
    run = folder.run
    source = run.get("input_model", {}) or folder.before.get("model", {})
    settings = run.get("settings", {})
    # run.json names the folder the run was written to (the report is rendered before `<out>.partial` is renamed)
    items = [("run folder", Path(run.get("out", folder.path)).name), ("method", str(run.get("method", "–"))),
             ("input model", f"{source.get('source', '–')} (sha256 {short_sha(source.get('sha256'))})"),
             ("unlearned model", f"sha256 {short_sha(folder.after.get('model', {}).get('sha256'))}"),
             ("band rule", str((folder.after.get("band") or {}).get("rule", "–"))),
             ("target", str(run.get("target") or settings.get("target") or "ma")),
             ("stop rule", str(settings.get("stop", "–"))), ("steps", str(run.get("steps", "–")))]
    if run.get("lambda") is not None:
        items.append(("λ (task vector)", f"{run['lambda']:.3f}"))
    if run.get("restored_step") is not None:
        items.append(("restored step", str(run["restored_step"])))
    if run.get("previous"):
        items.append(("continues", str(run["previous"])))
    if run.get("tool_version"):
        items.append(("made by", f"unmemorize {run['tool_version']}"))
    return items


def summary_cards(folder: RunFolder) -> list[dict]:
    """The minute-long read: did it work, what did it cost, does anything stand out."""
    run, fb, fa = folder.run, folder.forget_before, folder.forget_after
    reached = run.get("target_reached")
    cards = [card("Target", "reached" if reached else "not reached", f"stop reason: {run.get('stop_reason', '–')}",
                  "good" if reached else "bad")]
    for key, label in (("extractable", "Extractable"), ("verbatim", "Verbatim"), ("over_unlearned", "Over-unlearned")):
        after = fa.get(key)
        tone = "neutral" if after is None else "good" if after == 0 else "warn" if key == "over_unlearned" else "bad"
        cards.append(card(label, f"{fmt(fb.get(key))} → {fmt(after)}", f"of {fmt(fa.get('n', fb.get('n')))} forget "
                          "sequences", tone))
    for key, label in (("loss_memorized", "Memorized on loss"), ("loss_over_unlearned", "Over-unlearned on loss")):
        if key not in fa and key not in fb:  # runs made before the loss band
            continue
        after = fa.get(key)
        tone = "neutral" if after is None else "good" if after == 0 else "warn" if "over" in key else "bad"
        cards.append(card(label, f"{fmt(fb.get(key))} → {fmt(after)}", f"of {fmt(fa.get('n', fb.get('n')))} forget "
                          "sequences, against the loss band", tone))
    cards += utility_cards(run.get("utility", {}))
    cards += privacy_cards(folder.before.get("privacy", {}), folder.after.get("privacy", {}))
    cards.append(cost_card(run))
    earlier = earlier_summary(run.get("earlier"))
    if earlier:
        cards.append(card("Earlier requests", "stayed forgotten" if earlier["stayed_forgotten"] else "came back",
                          f"{earlier['requests']} request(s); extractable {earlier['extractable']}",
                          "good" if earlier["stayed_forgotten"] else "bad"))
    oracle = folder.after.get("oracle")
    if oracle:
        cards.append(card("Oracle", f"forget quality {fmt(oracle.get('forget_quality'), 3, 'g')}",
                          f"privleak {signed_pct(oracle.get('privleak'))}; status agreement "
                          f"{pct(oracle.get('status_agreement'))}", "neutral"))
    attacks = folder.after.get("attacks")
    if attacks:
        returned = sum(int(a.get("returned_extractable", 0)) for a in attacks.values())
        verbatim = sum(int(a.get("returned_verbatim", 0)) for a in attacks.values())
        paired = all("oracle" in a for a in attacks.values())
        beyond = sum(int(a.get("beyond_oracle_extractable", 0)) + int(a.get("beyond_oracle_verbatim", 0))
                     for a in attacks.values())
        cards.append(card("Attacks", f"{returned} returned", f"extractable under {len(attacks)} attack(s); "
                          f"{verbatim} returned verbatim"
                          + (f"; {beyond} beyond what the same attacks find on the oracle" if paired else ""),
                          "good" if returned == verbatim == 0 or (paired and beyond == 0) else "bad"))
    return cards


def card(label: str, value: str, detail: str | None = None, tone: str = "neutral") -> dict:
    return {"label": label, "value": value, "detail": detail or "", "tone": tone}


def utility_cards(utility: dict) -> list[dict]:
    """Retain MA, perplexities, generation health and each downstream metric: the "did it break" cards."""
    return [card(row["label"], f"{row['before_text']} → {row['after_text']}", row["change_text"], row["tone"])
            for row in utility_rows(utility) if row["key"] in CARD_MEASURES or row["group"] == "downstream"]


def privacy_cards(before: dict, after: dict) -> list[dict]:
    cards = []
    for name, label in (("loss", "Membership AUC (loss)"), ("umia", "Unlearning MIA AUC")):
        if f"{name}_auc" not in after and f"{name}_auc" not in before:
            continue
        value = after.get(f"{name}_auc")
        # 0.5 is the goal; far from it either way the forget set stands out (trained on, or unlearned)
        distance = None if value is None else abs(value - 0.5)
        tone = "neutral" if distance is None else "good" if distance < 0.15 else "warn" if distance < 0.3 else "bad"
        cards.append(card(label, f"{fmt(before.get(f'{name}_auc'), 2)} → {fmt(value, 2)}",
                          f"95% CI {interval(before.get(f'{name}_auc_ci'))} → {interval(after.get(f'{name}_auc_ci'))};"
                          " 0.5 = looks unseen", tone))
    return cards


def cost_card(run: dict) -> dict:
    tokens = run.get("tokens") or {}
    parts = [f"{fmt(run.get('steps'))} steps"]
    if tokens:
        parts.append(f"{count(tokens.get('forward'))} tokens forward, {count(tokens.get('backward'))} backward")
    elif run.get("tokens_trained") is not None:  # runs made before `tokens` was recorded
        parts.append(f"{count(run['tokens_trained'])} tokens trained")
    if run.get("peak_memory_mb") is not None:
        parts.append(f"peak memory {run['peak_memory_mb']:.0f} MB")
    seconds = run.get("seconds")
    return card("Time", "–" if seconds is None else duration(seconds), "; ".join(parts))


GENERATION_MEASURES = (("repeated_ngram_share", "Repeated n-gram share", "lower"),
                       ("distinct_n", "Distinct n-grams", "higher"))
CARD_MEASURES = ("retain_ma", "general_ppl", "holdout_ppl", "repeated_ngram_share")
# Measures of run.json's "utility", each with the direction that is better.
UTILITY_MEASURES = (("retain_ma", "Retain MA", "higher", 3), ("retain_loss", "Retain loss", "lower", 3),
                    ("general_ppl", "General perplexity", "lower", 2),
                    ("holdout_ppl", "Holdout perplexity", "lower", 2))


def utility_rows(utility: dict) -> list[dict]:
    before, after = utility.get("before") or {}, utility.get("after") or {}
    rows = []
    for key, label, better, digits in UTILITY_MEASURES:
        if before.get(key) is not None or after.get(key) is not None:
            rows.append(utility_row("model", key, label, before.get(key), after.get(key), better, digits))
    gen_before, gen_after = before.get("generation") or {}, after.get("generation") or {}
    for key, label, better in GENERATION_MEASURES:
        if key in gen_before or key in gen_after:
            rows.append(utility_row("generation", key, label, gen_before.get(key), gen_after.get(key), better, 3))
    down_before, down_after = before.get("downstream") or {}, after.get("downstream") or {}
    for task in dict.fromkeys([*down_before, *down_after]):
        metrics_before, metrics_after = down_before.get(task) or {}, down_after.get(task) or {}
        docs = metrics_after.get("n_docs", metrics_before.get("n_docs"))
        for metric in dict.fromkeys([*metrics_before, *metrics_after]):
            if metric == "n_docs" or "stderr" in metric:  # bookkeeping beside the scores, not scores
                continue
            b, a = metrics_before.get(metric), metrics_after.get(metric)
            if isinstance(b, int | float | None) and isinstance(a, int | float | None):
                label = f"{task}: {metric}" + (f" (n={docs})" if docs is not None else "")
                rows.append(utility_row("downstream", f"{task}/{metric}", label, b, a, None, 3))
    return rows


def utility_row(group: str, key: str, label: str, before: float | None, after: float | None, better: str | None,
                digits: int) -> dict:
    change, tone, text = None, "neutral", ""
    if before is not None and after is not None:
        change = after - before
        relative = change / before if before else None
        text = f"{change:+.{digits}f}" + (f" ({relative:+.1%})" if relative is not None else "")
        if better and abs(change) > 1e-12:
            tone = "good" if (change > 0) == (better == "higher") else "bad"
    return {"group": group, "key": key, "label": label, "before": before, "after": after, "change": change,
            "before_text": fmt(before, digits), "after_text": fmt(after, digits), "change_text": text, "tone": tone,
            "better": better or ""}


def privacy_rows(before: dict, after: dict) -> list[dict]:
    rows = []
    for name in AUC_NAMES:
        key = f"{name}_auc"
        if key in before or key in after:
            rows.append({"name": name, "help": AUC_HELP[name], "before": before.get(key), "after": after.get(key),
                         "before_text": fmt(before.get(key), 3), "after_text": fmt(after.get(key), 3),
                         "before_ci": interval(before.get(f"{key}_ci")), "after_ci": interval(after.get(f"{key}_ci"))})
    return rows


def set_rows(before: dict, after: dict) -> list[dict]:
    rows = []
    for name in dict.fromkeys([*before, *after]):
        b, a = before.get(name) or {}, after.get(name) or {}
        rows.append({"name": name, "n": a.get("n", b.get("n")), "mean_before": fmt(b.get("mean_ma"), 3),
                     "mean_after": fmt(a.get("mean_ma"), 3),
                     **{f"{key}_text": f"{fmt(b.get(key))} → {fmt(a.get(key))}"
                        for key in ("extractable", "verbatim", "over_unlearned", "loss_memorized",
                                    "loss_over_unlearned")}})
    return rows


def earlier_summary(earlier: dict | None) -> dict | None:
    """run.json's "earlier" (sequential requests): did the sequences of earlier requests stay forgotten?"""
    if not earlier:
        return None
    before, after = earlier.get("before") or {}, earlier.get("after") or {}
    return {"requests": fmt(earlier.get("requests")), "stayed_forgotten": bool(earlier.get("stayed_forgotten")),
            "n": fmt(after.get("n", before.get("n"))),
            "extractable": f"{fmt(before.get('extractable'))} → {fmt(after.get('extractable'))}",
            "verbatim": f"{fmt(before.get('verbatim'))} → {fmt(after.get('verbatim'))}",
            "over_unlearned": f"{fmt(before.get('over_unlearned'))} → {fmt(after.get('over_unlearned'))}"}


def el_key(audit_json: dict) -> str | None:
    """The first EL_n measured, shown in the per-sequence table (EL may be off: `--el-n 0`)."""
    for row in audit_json.get("sequences", []):
        if row.get("el"):
            return next(iter(row["el"]))
    return None


def sequence_rows(before: dict, after: dict, show_text: bool) -> list[dict]:
    """Every sequence of every set, before beside after; forget first. Text only when asked and held."""
    first = el_key(before) or el_key(after)
    old = {(s.get("set"), s.get("id")): s for s in before.get("sequences", [])}
    new = {(s.get("set"), s.get("id")): s for s in after.get("sequences", [])}
    keys = list(dict.fromkeys([*old, *new]))
    keys.sort(key=lambda k: k[0] != "forget")  # stable: each set keeps the audit's order
    rows = []
    for key in keys:
        b, a = old.get(key, {}), new.get(key, {})
        row = {"set": key[0], "id": str(key[1]), "hash": a.get("hash") or b.get("hash") or "",
               "n_tokens": a.get("n_tokens", b.get("n_tokens")), "ma_before": b.get("ma"), "ma_after": a.get("ma"),
               "status_before": b.get("status"), "status_after": a.get("status"),
               "loss_status_before": b.get("loss_status"), "loss_status_after": a.get("loss_status"),
               "verbatim_before": b.get("verbatim"), "verbatim_after": a.get("verbatim"),
               "loss_before": b.get("loss"), "loss_after": a.get("loss"),
               "el_before": (b.get("el") or {}).get(first), "el_after": (a.get("el") or {}).get(first)}
        if show_text:
            row["text"] = a.get("text", b.get("text"))
        rows.append(row)
    return rows


def run_plots(folder: RunFolder, sequences: list[dict]) -> list[dict]:
    """Every figure of the run page, in page order: {"id", "section", "uri", "alt", "caption"}."""
    before, after = folder.before, folder.after
    figures = []
    forget = [s for s in sequences if s["set"] == "forget"]
    if forget:
        figures.append(figure(
            "plot-ma-before-after", "memorization",
            plots.ma_before_after([{"id": s["id"], "ma_before": s["ma_before"], "ma_after": s["ma_after"],
                                    "status_after": s["status_after"]} for s in forget],
                                  before.get("band"), after.get("band")),
            "Forget MA before and after unlearning, one row per sequence, with the band shaded",
            "Each forget sequence's MA before (open circle) and after (filled, coloured by its status after). "
            "Shaded: the band after unlearning, which decides the statuses; dashed: the band before."))
    figures.append(figure(
        "plot-ma-histograms", "histograms",
        plots.ma_histograms(ma_by_set(before), ma_by_set(after), before.get("band"), after.get("band")),
        "Histograms of MA per set before and after unlearning, with band limits",
        "MA of every set under the model before (left) and after (right); dashed lines are that model's band."))
    trajectory = trajectory_series(folder.trajectory)
    restored = folder.run.get("restored_step")
    if trajectory:
        figures.append(figure(
            "plot-trajectories", "trajectories",
            plots.trajectories(**trajectory, restored=restored),
            "Each forget sequence's MA over the unlearning steps, with the recalibrated band shaded",
            "MA of each forget sequence at every step; the shaded band is re-measured on the holdout under the "
            "current model as unlearning goes. Bottom: the loss of the update taken from each step."
            + ("" if restored is None else f" Dashed: step {restored}, whose weights the run kept (a guard "
               "restored it).")))
    roc_before, roc_after = before.get("privacy", {}).get("roc"), after.get("privacy", {}).get("roc")
    if roc_before or roc_after:
        figures.append(figure(
            "plot-roc", "privacy",
            plots.roc_curves(roc_before, roc_after, before.get("privacy", {}), after.get("privacy", {})),
            "ROC curves of the membership scores, forget versus holdout, before and after unlearning",
            "How well each score tells the forget set from unseen holdout text. The diagonal is chance: after a "
            "good unlearning every curve lies near it."))
    if folder.localization and folder.localization.get("mean_effect"):
        figures.append(figure(
            "plot-localization", "localization", plots.layer_effects(folder.localization),
            "Causal tracing: per layer, the forget continuations' probability restored by that layer's MLP",
            "For each layer, how much of the forget continuations' mean token probability its MLP output, copied "
            "from the clean run, brings back when the prefixes' embeddings are noised (bars: mean over the "
            "request; dots: each sequence). Filled bars: the layers whose MLPs were unlearned."))
    oracle = after.get("oracle")
    if oracle and oracle.get("sequences"):
        figures.append(figure(
            "plot-oracle", "oracle", plots.oracle_scatter(oracle["sequences"]),
            "Forget MA after unlearning against MA under the oracle model",
            "Each forget sequence: MA under the unlearned model (up) against the oracle that never saw it "
            "(across). On the diagonal the unlearned model treats it like the oracle does."))
    return figures


def localization_summary(localization: dict | None) -> dict | None:
    """What the page says of --localize: the spec, the layers trained, the clean and corrupted probabilities."""
    if not localization:
        return None
    return {"spec": localization.get("localize", "–"),
            "layers": ", ".join(str(layer) for layer in localization.get("trained_layers", [])) or "–",
            "clean": fmt(localization.get("clean"), 3), "corrupted": fmt(localization.get("corrupted"), 3),
            "noise_std": fmt(localization.get("noise_std"), 3), "samples": fmt(localization.get("samples"))}


def figure(plot_id: str, section: str, uri: str, alt: str, caption: str) -> dict:
    return {"id": plot_id, "section": section, "uri": uri, "alt": alt, "caption": caption}


def ma_by_set(audit_json: dict) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for row in audit_json.get("sequences", []):
        if row.get("ma") is not None:
            values.setdefault(row.get("set", "?"), []).append(row["ma"])
    return values


def trajectory_series(lines: list[dict]) -> dict | None:
    """Columns for the trajectory plot; None when the run took no logged gradient step."""
    lines = [line for line in lines if isinstance(line.get("ma"), dict)]
    if not lines:
        return None
    names = list(dict.fromkeys(name for line in lines for name in line["ma"]))
    bands = [line.get("band") or [None, None] for line in lines]
    return {"steps": [line.get("step", k) for k, line in enumerate(lines)],
            "ma": {name: [line["ma"].get(name) for line in lines] for name in names},
            "lower": [band[0] for band in bands], "upper": [band[1] for band in bands],
            "loss": [line.get("loss") for line in lines]}


def attack_section(attacks: dict | None, sequences: list[dict]) -> dict | None:
    """A summary row per attack and a matrix: forget sequence × attack → status under that attack."""
    if not attacks:
        return None
    names = list(attacks)
    summary = [{"name": name, "returned_extractable": entry.get("returned_extractable"),
                "returned_verbatim": entry.get("returned_verbatim"), "oracle": entry.get("oracle"),
                "beyond_oracle_extractable": entry.get("beyond_oracle_extractable"),
                "beyond_oracle_verbatim": entry.get("beyond_oracle_verbatim"), "extractable": entry.get("extractable"),
                "verbatim": entry.get("verbatim"), "n": entry.get("n"), "seconds": entry.get("seconds"),
                "description": entry.get("description", "")} for name, entry in attacks.items()]
    by_attack = {name: {str(r.get("id")): r for r in entry.get("sequences", [])} for name, entry in attacks.items()}
    rows = []
    for seq in (s for s in sequences if s["set"] == "forget"):
        cells = [attack_cell(by_attack[name].get(seq["id"]), seq["id"] in attacks[name].get("trained_ids", []))
                 for name in names]
        rows.append({"id": seq["id"], "hash": seq["hash"], "status": seq["status_after"], "cells": cells})
    return {"names": names, "summary": summary, "rows": rows,
            "paired": any(entry.get("oracle") is not None for entry in attacks.values())}


def attack_cell(result: dict | None, trained_on: bool) -> dict:
    if result is None:  # relearn audits only the half it did not train on
        return {"text": "trained on" if trained_on else "–", "status": "", "returned": False}
    returned = bool(result.get("returned_extractable") or result.get("returned_verbatim"))
    status = result.get("status") or ""
    text = status.replace("_", " ") + (" · verbatim" if result.get("verbatim") else "")
    if returned and "beyond_oracle_extractable" in result:  # the oracle under the same attack shows it too?
        beyond = result["beyond_oracle_extractable"] or result["beyond_oracle_verbatim"]
        return {"text": text + (" (returned)" if beyond else " (returned; the oracle's too)"), "status": status,
                "returned": bool(beyond)}
    return {"text": text + (" (returned)" if returned else ""), "status": status, "returned": returned}


def oracle_section(before: dict | None, after: dict | None) -> dict | None:
    if not before and not after:
        return None
    before, after = before or {}, after or {}
    measures = (("forget_quality", "Forget quality (KS p-value; high = like the oracle)", 3, "g"),
                ("ks_statistic", "KS statistic", 3, "f"),
                ("privleak", "PrivLeak (0 = the oracle's leakage)", 1, "pct"),
                ("status_agreement", "Status agreement with the oracle", 0, "pct"),
                ("umia_auc", "The oracle's own U-MIA AUC (forget vs holdout; the run's should not exceed it much)", 2,
                 "f"))
    rows = [{"label": label, "before": fmt_kind(before.get(key), digits, kind),
             "after": fmt_kind(after.get(key), digits, kind)} for key, label, digits, kind in measures
            if key in before or key in after]
    source = after or before
    under = source.get("oracle_forget") or {}
    under_text = (f"{fmt(under.get('extractable'))} extractable, {fmt(under.get('verbatim'))} verbatim, "
                  f"{fmt(under.get('over_unlearned'))} over-unlearned of {fmt(under.get('n'))}; mean MA "
                  f"{fmt(under.get('mean_ma'), 3)}") if under else ""
    return {"rows": rows, "score": source.get("privleak_score"), "model": (source.get("model") or {}).get("source"),
            "under_oracle": under_text, "sequences": [oracle_row(s) for s in source.get("sequences", [])]}


def oracle_row(row: dict) -> dict:
    keys = ("id", "hash", "ma", "oracle_ma", "status", "oracle_status", "loss", "oracle_loss")
    return {key: row.get(key) for key in keys}


# ---- the comparison page --------------------------------------------------------------------------------


def compare_context(out_dir: Path, runs: dict[str, RunFolder]) -> dict:
    rows = sorted((compare_row(name, folder, out_dir) for name, folder in runs.items()), key=rank)
    for position, row in enumerate(rows, start=1):
        row["rank"] = position
    inputs = list(dict.fromkeys(str((f.run.get("input_model") or {}).get("source", "–")) for f in runs.values()))
    figures = [figure("plot-compare-tradeoff", "comparison", plots.compare_tradeoff(rows),
                      "Utility loss against forget mean MA after, one marker per run",
                      "Each run's utility loss (largest relative drop of retain MA or rise of general perplexity) "
                      "against the forget set's mean MA after; filled markers reached the target.")]
    return {"title": f"Unlearning comparison: {len(runs)} runs", "version": __version__, "rows": rows,
            "inputs": inputs, "plots": figures, "matrix": compare_matrix(rows, runs)}


def compare_row(name: str, folder: RunFolder, out_dir: Path) -> dict:
    run, fb, fa = folder.run, folder.forget_before, folder.forget_after
    utility = run.get("utility") or {}
    after = utility.get("after") or {}
    link = Path(os.path.relpath(folder.path / REPORT, out_dir)).as_posix()
    return {"name": name, "method": run.get("method", "–"), "target_reached": bool(run.get("target_reached")),
            "extractable_before": fb.get("extractable"), "extractable_after": fa.get("extractable"),
            "verbatim_after": fa.get("verbatim"), "over_unlearned_after": fa.get("over_unlearned"),
            "target": run.get("target") or (run.get("settings") or {}).get("target") or "ma",
            "loss_memorized_after": fa.get("loss_memorized"),
            "loss_over_unlearned_after": fa.get("loss_over_unlearned"),
            "mean_ma": fa.get("mean_ma"), "utility_loss": utility_loss(utility),
            "retain_ma_after": after.get("retain_ma"), "general_ppl_after": after.get("general_ppl"),
            "umia_after": folder.after.get("privacy", {}).get("umia_auc"), "steps": run.get("steps"),
            "seconds": run.get("seconds"), "link": link,
            "certificate": certificate_link(folder, out_dir),
            "cards": summary_cards(folder)[:4]}


def certificate_link(folder: RunFolder, out_dir: Path) -> str | None:
    path = folder.path / "certificate.json"
    return Path(os.path.relpath(path, out_dir)).as_posix() if path.exists() else None


def utility_loss(utility: dict) -> float | None:
    """The largest relative degradation, as the unlearning guard measures it: retain MA falling or general
    perplexity rising (0 when neither got worse)."""
    before, after = utility.get("before") or {}, utility.get("after") or {}
    drops = []
    if before.get("general_ppl") and after.get("general_ppl") is not None:
        drops.append(after["general_ppl"] / before["general_ppl"] - 1)
    if before.get("retain_ma") and after.get("retain_ma") is not None:
        drops.append(1 - after["retain_ma"] / before["retain_ma"])
    return max(0.0, *drops) if drops else None


def rank(row: dict) -> tuple:
    """What matters, in order: target reached, fewest over-unlearned, least utility loss, fastest."""
    def last_if_none(value):
        return (value is None, value if value is not None else 0)

    return (not row["target_reached"], last_if_none(row["over_unlearned_after"]),
            last_if_none(row["utility_loss"]), last_if_none(row["seconds"]))


def compare_matrix(rows: list[dict], runs: dict[str, RunFolder]) -> dict:
    """Forget sequence × run: MA after and status, beside MA before under the first run's input model."""
    names = [row["name"] for row in rows]
    first = runs[names[0]]
    before = {str(s.get("id")): s for s in first.before.get("sequences", []) if s.get("set") == "forget"}
    after = {name: {str(s.get("id")): s for s in runs[name].after.get("sequences", []) if s.get("set") == "forget"}
             for name in names}
    ids = list(dict.fromkeys([*before, *(i for name in names for i in after[name])]))
    table = []
    for seq_id in ids:
        cells = [after[name].get(seq_id, {}) for name in names]
        table.append({"id": seq_id, "hash": before.get(seq_id, {}).get("hash") or next(
            (c.get("hash") for c in cells if c.get("hash")), ""), "ma_before": before.get(seq_id, {}).get("ma"),
            "cells": [{"ma": c.get("ma"), "status": c.get("status") or ""} for c in cells]})
    return {"names": names, "rows": table}


# ---- formatting and the template environment ------------------------------------------------------------


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt, pct=pct, seconds=duration, sortkey=sort_key)
    return env


def fmt(value, digits: int = 0, kind: str = "f") -> str:
    """Numbers for people: "–" for a missing value, ints as they are, floats to `digits`."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and kind == "f":
        return str(value)
    if isinstance(value, int | float):
        return f"{value:.{digits}{kind}}"
    return str(value)


def fmt_kind(value, digits: int, kind: str) -> str:
    return pct(value, digits) if kind == "pct" else fmt(value, digits, kind)


def pct(value, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}%}"


def signed_pct(value) -> str:
    return "–" if value is None else f"{value:+.1%}"


def interval(ci) -> str:
    if not ci or len(ci) != 2 or None in ci:
        return "–"
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def count(value) -> str:
    """Token counts: 46,984 → 47.0k; millions as M."""
    if value is None:
        return "–"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def duration(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def sort_key(value) -> str:
    """The `data-sort` of a table cell: numbers as numbers, booleans as 1/0, missing as empty (sorted last)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def short_sha(digest: str | None) -> str:
    return "–" if not digest else digest[:12]
