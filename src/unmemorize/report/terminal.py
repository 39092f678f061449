"""Terminal output (Rich). Sequences appear by id and short hash, never by text unless asked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..measure.audit import AuditResult

STATUS_STYLE = {"extractable": "bold red", "memorized": "bold red", "in_band": "green", "over_unlearned": "yellow",
                None: "dim"}


def audit_table(result: AuditResult, sets: tuple[str, ...] = ("forget",), show_text: bool = False,
                title: str = "Per-sequence memorization") -> Table:
    el_keys = result.settings["el_n_keys"]
    table = Table(title=title, title_justify="left")
    for column in ("set", "id", "hash", "tokens", "MA", *[f"EL{n}" for n in el_keys], "verbatim", "loss", "status",
                   "loss status"):
        table.add_column(column, justify="right" if column not in ("set", "id", "status", "loss status") else "left")
    if show_text:
        table.add_column("text", overflow="fold")
    for row in result.sequences:
        if row.set not in sets:
            continue
        els = ["-" if row.el.get(n) is None else f"{row.el[n]:.2f}" for n in el_keys]
        cells = [row.set, row.id, row.hash, str(row.n_tokens), f"{row.ma:.3f}", *els,
                 "yes" if row.verbatim else "no", f"{row.loss:.3f}",
                 f"[{STATUS_STYLE[row.status]}]{row.status or '-'}[/]",
                 f"[{STATUS_STYLE[row.loss_status]}]{row.loss_status or '-'}[/]"]
        table.add_row(*cells, *([row.text] if show_text else []))
    return table


def sets_table(result: AuditResult) -> Table:
    table = Table(title="Sets", title_justify="left")
    for column in ("set", "n", "mean MA", "max MA", "extractable", "verbatim", "over-unlearned", "mean loss",
                   "loss memorized", "loss over-unlearned"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name in result.set_names():
        s = result.summary(name)
        table.add_row(name, str(s["n"]), f"{s['mean_ma']:.3f}", f"{s['max_ma']:.3f}", str(s["extractable"]),
                      str(s["verbatim"]), str(s["over_unlearned"]), f"{s['mean_loss']:.3f}",
                      str(s["loss_memorized"]), str(s["loss_over_unlearned"]))
    return table


def print_audit(result: AuditResult, console: Console, show_text: bool = False) -> None:
    console.print(audit_table(result, show_text=show_text))
    console.print(sets_table(result))
    if result.band is None:
        console.print("[yellow]No holdout given: the band, statuses and privacy AUCs need --holdout.[/]")
        return
    band = result.band
    lower = "-" if band.lower is None else f"{band.lower:.3f}"
    console.print(f"Band ({band.rule}, from {band.n} holdout sequences): MA in [{lower}, {band.upper:.3f}]")
    if result.loss_band is not None:
        loss = result.loss_band
        console.print(f"Loss band (same rule and holdout): loss in [{_edge(loss.lower)}, {_edge(loss.upper)}]; "
                      "under it: memorized, above it: over-unlearned")
    if result.privacy:
        p = result.privacy
        aucs = "  ".join(f"{k[:-4]} {p[k]:.2f} [{p[k + '_ci'][0]:.2f}, {p[k + '_ci'][1]:.2f}]"
                         for k in p if k.endswith("_auc"))
        console.print(f"Membership AUC forget vs holdout: {aucs}")


def _edge(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_guard(extra: dict, console: Console) -> None:
    """The guard a model was measured through (`decoding`: what it does, and that it protects a deployment, not
    the weights) and the general-text perplexity through it (`utility`), when `extra` has them."""
    utility = extra.get("utility") or {}
    if utility.get("general_ppl") is not None:
        console.print(f"General-text perplexity: {utility['general_ppl']:.2f} "
                      f"({utility.get('general_sequences', '?')} sequences)")
    guard = extra.get("decoding")
    if not guard:
        return
    console.print(f"Measured through --decoding {guard['decoding']} (weights changed: no): {guard['explanation']}.")
    console.print(f"[yellow]{guard['note']}[/]")


def print_oracle(result: AuditResult, console: Console) -> None:
    """Forget quality and privleak against the oracle, when the audit has them."""
    oracle = result.extra.get("oracle")
    if not oracle:
        return
    forget = oracle["oracle_forget"]
    console.print(f"Oracle: forget quality (KS p) {oracle['forget_quality']:.3g}, "
                  f"privleak ({oracle['privleak_score']}) {oracle['privleak']:+.1%}, "
                  f"status agreement {oracle['status_agreement']:.0%}"
                  + (f", the oracle's own umia {oracle['umia_auc']:.2f}" if oracle.get("umia_auc") is not None else "")
                  + "; under the oracle "
                  f"{forget['extractable']} extractable, {forget['verbatim']} verbatim, "
                  f"{forget['over_unlearned']} over-unlearned")


def attack_table(attacks: dict, baseline: AuditResult, title: str = "Attacks") -> Table:
    """One row per attack: how many forget sequences it brings back to extractable or verbatim; when the attacks
    also ran on the oracle, how many it brings back there and how many beyond those the oracle shows."""
    forget = baseline.summary("forget")
    table = Table(title=f"{title} (without attack: {forget['extractable']} extractable, {forget['verbatim']} "
                  f"verbatim of {forget['n']})", title_justify="left")
    paired = any("oracle" in entry for entry in attacks.values())
    columns = ("attack", "returned extractable", "returned verbatim",
               *(("on the oracle", "beyond the oracle") if paired else ()))
    for column in columns:
        table.add_column(column, justify="left" if column == "attack" else "right")
    for name, entry in attacks.items():  # what each attack does: attack.json / the report's descriptions
        cells = [name, str(entry["returned_extractable"]), str(entry["returned_verbatim"])]
        if paired:
            oracle = entry.get("oracle")
            cells += ["-", "-"] if oracle is None else [
                f"{oracle['returned_extractable']} / {oracle['returned_verbatim']}",
                f"{entry['beyond_oracle_extractable']} / {entry['beyond_oracle_verbatim']}"]
        table.add_row(*cells)
    return table


def compare_table(rows: list[dict], title: str = "Methods compared (best first)") -> Table:
    """compare.json's rows: target, what is left of the request, utility, cost."""
    table = Table(title=title, title_justify="left")
    for column in ("run", "target", "extractable", "verbatim", "over-unlearned", "loss memorized",
                   "loss over-unlearned", "retain MA", "general ppl", "utility loss", "steps", "seconds"):
        table.add_column(column, justify="left" if column in ("run", "target") else "right")
    for r in rows:
        retain = "-" if r["retain_ma"] is None else f"{r['retain_ma_before']:.3f} → {r['retain_ma']:.3f}"
        target = f" ({r['target']})" if r.get("target") else ""
        reached = f"[green]reached{target}[/]" if r["target_reached"] else f"[red]not reached{target}[/]"
        loss_memorized = f"{_count(r.get('loss_memorized_before'))} → {_count(r.get('loss_memorized'))}"
        table.add_row(r["run"], reached, f"{r['extractable_before']} → {r['extractable']}",
                      f"{r['verbatim_before']} → {r['verbatim']}", str(r["over_unlearned"]), loss_memorized,
                      _count(r.get("loss_over_unlearned")), retain,
                      f"{r['general_ppl_before']:.2f} → {r['general_ppl']:.2f}", f"{r['utility_loss']:.1%}",
                      str(r["steps"]), f"{r['seconds']:.0f}")
    return table


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def plan_table(plan: dict) -> Table:
    """`unmemorize plan --json`'s layouts side by side: GiB per device for each term, the largest passing moment,
    the peak and whether it fits the device."""
    names = {"single": "1 device", "ddp": "DDP", "fsdp": "FSDP"}
    layouts = plan["layouts"]
    table = Table(title="GiB per device", title_justify="left")
    table.add_column("")
    for name, layout in layouts.items():
        table.add_column(names[name] + (f" x {layout['devices']}" if layout["devices"] > 1 else ""), justify="right")
    terms = list(dict.fromkeys(key for layout in layouts.values() for key in layout["terms"]))
    for term in terms:
        table.add_row(term, *(_gib(layout["terms"].get(term)) for layout in layouts.values()))
    for moment in dict.fromkeys(key for layout in layouts.values() for key in layout["moments"]):
        table.add_row(f"[dim]+ {moment} (passing)[/]", *(_gib(layout["moments"].get(moment), dim=True)
                                                         for layout in layouts.values()))
        if moment == "step":  # its parts
            for part in dict.fromkeys(key for layout in layouts.values() for key in layout["step"]):
                table.add_row(f"[dim]    {part}[/]", *(_gib(layout["step"].get(part), dim=True)
                                                       for layout in layouts.values()))
    for phase in dict.fromkeys(key for layout in layouts.values() for key in layout["phases"]):
        table.add_row(f"[dim]{phase} (whole model)[/]", *(_gib(layout["phases"].get(phase), dim=True)
                                                          for layout in layouts.values()))
    table.add_row("runtime (process, CUDA context)", *(_gib(layout["runtime"]) for layout in layouts.values()))
    memory = plan["device_memory"]
    table.add_row("[bold]peak[/]", *(f"[bold]{_gib(layout['peak'])}[/]" for layout in layouts.values()))
    table.add_row(f"fits in {memory / 2**30:.1f}", *("[green]yes[/]" if layout["peak"] <= memory else "[red]no[/]"
                                                      for layout in layouts.values()))
    return table


def _gib(value: int | None, dim: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value / 2**30:.2f}" if value < 10 * 2**30 else f"{value / 2**30:.1f}"
    return f"[dim]{text}[/]" if dim else text
