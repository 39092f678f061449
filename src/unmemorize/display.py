"""Terminal output (Rich). Sequences appear by id and short hash, never by text unless asked."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .audit import AuditResult

STATUS_STYLE = {"extractable": "bold red", "in_band": "green", "over_unlearned": "yellow", None: "dim"}


def audit_table(result: AuditResult, sets: tuple[str, ...] = ("forget",), show_text: bool = False,
                title: str = "Per-sequence memorization") -> Table:
    el_keys = result.settings["el_n_keys"]
    table = Table(title=title, title_justify="left")
    for column in ("set", "id", "hash", "tokens", "MA", *[f"EL{n}" for n in el_keys], "verbatim", "loss", "status"):
        table.add_column(column, justify="right" if column not in ("set", "id", "status") else "left")
    if show_text:
        table.add_column("text", overflow="fold")
    for row in result.sequences:
        if row.set not in sets:
            continue
        els = ["-" if row.el.get(n) is None else f"{row.el[n]:.2f}" for n in el_keys]
        cells = [row.set, row.id, row.hash, str(row.n_tokens), f"{row.ma:.3f}", *els,
                 "yes" if row.verbatim else "no", f"{row.loss:.3f}",
                 f"[{STATUS_STYLE[row.status]}]{row.status or '-'}[/]"]
        table.add_row(*cells, *([row.text] if show_text else []))
    return table


def sets_table(result: AuditResult) -> Table:
    table = Table(title="Sets", title_justify="left")
    for column in ("set", "n", "mean MA", "max MA", "extractable", "verbatim", "over-unlearned"):
        table.add_column(column, justify="left" if column == "set" else "right")
    for name in result.set_names():
        s = result.summary(name)
        table.add_row(name, str(s["n"]), f"{s['mean_ma']:.3f}", f"{s['max_ma']:.3f}", str(s["extractable"]),
                      str(s["verbatim"]), str(s["over_unlearned"]))
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
    if result.privacy:
        p = result.privacy
        aucs = "  ".join(f"{k[:-4]} {p[k]:.2f} [{p[k + '_ci'][0]:.2f}, {p[k + '_ci'][1]:.2f}]"
                         for k in p if k.endswith("_auc"))
        console.print(f"Membership AUC forget vs holdout: {aucs}")


def run_table(results: list, title: str = "Unlearning runs") -> Table:
    """One row per run: what the request looks like after, utility, cost."""
    table = Table(title=title, title_justify="left")
    for column in ("method", "target", "extractable", "verbatim", "over-unlearned", "retain MA", "general ppl",
                   "steps", "seconds"):
        table.add_column(column, justify="left" if column in ("method", "target") else "right")
    for result in results:
        run, before, after = result.run, result.before.summary("forget"), result.after.summary("forget")
        u0, u1 = run["utility"]["before"], run["utility"]["after"]
        retain = "-" if u0["retain_ma"] is None else f"{u0['retain_ma']:.3f} → {u1['retain_ma']:.3f}"
        table.add_row(run["method"], "[green]reached[/]" if run["target_reached"] else "[red]not reached[/]",
                      f"{before['extractable']} → {after['extractable']}",
                      f"{before['verbatim']} → {after['verbatim']}",
                      str(after["over_unlearned"]), retain, f"{u0['general_ppl']:.2f} → {u1['general_ppl']:.2f}",
                      str(run["steps"]), f"{run['seconds']:.0f}")
    return table
