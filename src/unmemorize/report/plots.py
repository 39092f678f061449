"""The report's figures, drawn with matplotlib and returned as inline `data:` URIs (SVG).

Figures name sequences by id only, never by text. SVG keeps them sharp when printed; each goes into an
<img>, which keeps matplotlib's internal ids (clip paths, glyphs) from clashing between figures. Figures
are made with `matplotlib.figure.Figure`, not pyplot: no GUI backend is touched (the non-interactive
canvases draw them, as Agg would) and nothing global is left behind in the caller's process.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

STATUS_COLOR = {"extractable": "#c62828", "in_band": "#2e7d32", "over_unlearned": "#ef6c00", None: "#757575"}
SET_COLOR = {"forget": "#c62828", "retain": "#1565c0", "holdout": "#2e7d32", "earlier": "#6a1b9a"}
BAND_COLOR = "#2e7d32"
BEFORE_COLOR = "#9e9e9e"
MAX_LABEL = 18  # characters of an id shown on an axis: ids are user data and may be long

# Ids are user data: "$" must not switch matplotlib into mathtext. Fixed hash salt and no date: the same
# run renders to the same bytes.
STYLE = {"text.parse_math": False, "svg.hashsalt": "unmemorize", "svg.fonttype": "path", "font.size": 9,
         "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10, "legend.fontsize": 8,
         "legend.frameon": False}


@contextmanager
def figure(width: float, height: float, rows: int = 1, cols: int = 1, **options) -> Iterator[tuple[Figure, list]]:
    """A fresh figure with its axes as a flat list; the report's style holds while it is drawn and saved."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, **options)
        yield fig, list(axes.flat)


def to_data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def short(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def shade_band(ax, lower: float | None, upper: float | None, vertical: bool = False, label: str | None = "band",
               alpha: float = 0.15) -> None:
    """The band of "looks unseen" as a shaded span; with no lower bound (rule `mean`) it starts at 0."""
    if upper is None:
        return
    low = 0.0 if lower is None else lower
    span = ax.axvspan if vertical else ax.axhspan
    span(low, upper, color=BAND_COLOR, alpha=alpha, lw=0, label=label)


def ma_before_after(rows: list[dict], band_before: dict | None, band_after: dict | None) -> str:
    """One line per forget sequence: MA before (grey) → after (coloured by its status after), band shaded.

    `rows`: {"id", "ma_before", "ma_after", "status_after"}. The shaded band is the one that judges the
    statuses after unlearning; the band before is drawn as dashed lines.
    """
    rows = sorted(rows, key=lambda r: (r["ma_before"] if r["ma_before"] is not None else -1))
    height = min(16.0, 1.2 + 0.26 * len(rows))
    with figure(8.0, height) as (fig, (ax,)):
        shade_band(ax, *_limits(band_after), vertical=True, label="band after")
        for value in _limits(band_before):
            if value is not None:
                ax.axvline(value, color=BAND_COLOR, ls="--", lw=0.8)
        ax.plot([], [], color=BAND_COLOR, ls="--", lw=0.8, label="band before")
        for y, row in enumerate(rows):
            before, after = row["ma_before"], row["ma_after"]
            if before is not None and after is not None:
                ax.annotate("", xy=(after, y), xytext=(before, y),
                            arrowprops={"arrowstyle": "->", "color": "#bdbdbd", "lw": 1})
            if before is not None:
                ax.plot(before, y, "o", mfc="white", mec=BEFORE_COLOR, ms=6)
            if after is not None:
                ax.plot(after, y, "o", color=STATUS_COLOR.get(row["status_after"], STATUS_COLOR[None]), ms=6)
        ax.plot([], [], "o", mfc="white", mec=BEFORE_COLOR, label="MA before")
        for status in ("extractable", "in_band", "over_unlearned"):
            ax.plot([], [], "o", color=STATUS_COLOR[status], label=f"after: {status}")
        ax.set_yticks(range(len(rows)), [short(r["id"]) for r in rows], fontsize=8 if len(rows) <= 40 else 6)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("memorization accuracy (MA)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) > 6 else -0.3), ncol=3)
        return to_data_uri(fig)


def ma_histograms(before: dict[str, list[float]], after: dict[str, list[float]], band_before: dict | None,
                  band_after: dict | None) -> str:
    """MA of every set before and after (two panels), each with its own band's limits as lines."""
    bins = np.linspace(0, 1, 21)
    with figure(10.0, 3.2, 1, 2, sharey=True) as (fig, axes):
        for ax, values, band, title in ((axes[0], before, band_before, "before"), (axes[1], after, band_after,
                                                                                    "after")):
            for name, ma in values.items():
                if ma:
                    ax.hist(ma, bins=bins, histtype="step", lw=1.6, color=SET_COLOR.get(name, "#424242"),
                            label=f"{name} (n={len(ma)})")
            shade_band(ax, *_limits(band), vertical=True, alpha=0.1)
            for value in _limits(band):
                if value is not None:
                    ax.axvline(value, color=BAND_COLOR, ls="--", lw=0.9)
            ax.set_title(f"MA {title} unlearning")
            ax.set_xlabel("MA")
            ax.set_xlim(0, 1)
        axes[0].set_ylabel("sequences")
        handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(),
                                                                          strict=True)}
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=len(handles))
        return to_data_uri(fig)


def trajectories(steps: list[int], ma: dict[str, list[float | None]], lower: list[float | None],
                 upper: list[float | None], loss: list[float | None], restored: int | None = None) -> str:
    """Each forget sequence's MA over the steps, the (recalibrated) band shaded; the loss underneath.

    `restored`: the step whose weights the run kept (utility guard or divergence), marked with a line.
    """
    has_loss = any(v is not None for v in loss)
    with figure(10.0, 4.8 if has_loss else 3.6, 2 if has_loss else 1, 1, sharex=True,
                gridspec_kw={"height_ratios": [3, 1]} if has_loss else None) as (fig, axes):
        ax = axes[0]
        low = np.array([0.0 if v is None else v for v in lower], dtype=float)
        high = np.array([np.nan if v is None else v for v in upper], dtype=float)
        ax.fill_between(steps, low, high, step="post", color=BAND_COLOR, alpha=0.15, lw=0, label="band")
        colors = matplotlib.colormaps["tab10" if len(ma) <= 10 else "tab20"]
        marker = "o" if len(steps) <= 3 else None  # a run of one or two steps would draw no visible line
        legend = len(ma) <= 12  # beyond that a legend is unreadable: label the line ends instead
        for k, (name, values) in enumerate(ma.items()):
            series = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(steps, series, lw=1.2, marker=marker, ms=3, color=colors(k % colors.N), label=short(name))
            last = _last_finite(series)
            if not legend and last is not None and len(ma) <= 40:
                ax.annotate(short(name), (steps[last], series[last]), xytext=(3, 0), textcoords="offset points",
                            fontsize=6, va="center", color=colors(k % colors.N))
        if restored is not None:
            for axis in axes:
                axis.axvline(restored, color="#424242", ls="--", lw=1)
            ax.plot([], [], color="#424242", ls="--", lw=1, label=f"kept step {restored}")
        ax.set_ylabel("forget MA")
        ax.set_ylim(-0.02, 1.02)
        if legend:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if has_loss:
            axes[1].plot(steps, [np.nan if v is None else v for v in loss], color="#424242", lw=1)
            axes[1].set_ylabel("loss")
        axes[-1].set_xlabel("step")
        return to_data_uri(fig)


def roc_curves(before: dict | None, after: dict | None, aucs_before: dict, aucs_after: dict) -> str:
    """ROC of every membership score, forget (members) vs holdout, before and after unlearning."""
    with figure(9.0, 4.2, 1, 2, sharey=True) as (fig, axes):
        for ax, roc, aucs, title in ((axes[0], before, aucs_before, "before"), (axes[1], after, aucs_after,
                                                                                "after")):
            ax.plot([0, 1], [0, 1], color="#bdbdbd", ls=":", lw=1)
            for name, curve in (roc or {}).items():
                auc = aucs.get(f"{name}_auc")
                label = name if auc is None else f"{name} (AUC {auc:.2f})"
                ax.plot(curve["fpr"], curve["tpr"], lw=1.4, label=label)  # roc_curve gives the corners
            ax.set_title(f"{title} unlearning")
            ax.set_xlabel("false positive rate (holdout)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_aspect("equal")
            ax.legend(loc="lower right")
        axes[0].set_ylabel("true positive rate (forget)")
        return to_data_uri(fig)


def oracle_scatter(rows: list[dict]) -> str:
    """Each forget sequence's MA under the unlearned model against its MA under the oracle (y = x is ideal)."""
    with figure(4.2, 4.0) as (fig, (ax,)):
        ax.plot([0, 1], [0, 1], color="#bdbdbd", ls=":", lw=1)
        for row in rows:
            ax.plot(row["oracle_ma"], row["ma"], "o", color=STATUS_COLOR.get(row["status"], STATUS_COLOR[None]),
                    ms=6)
            if len(rows) <= 30:
                ax.annotate(short(row["id"]), (row["oracle_ma"], row["ma"]), xytext=(4, 2),
                            textcoords="offset points", fontsize=7)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("MA under the oracle")
        ax.set_ylabel("MA after unlearning")
        return to_data_uri(fig)


def layer_effects(localization: dict) -> str:
    """Causal tracing (localization.json): one bar per layer, its mean effect over the request, filled for the
    layers unlearned; a dot per sequence and layer; dashed, the probability the noise took away (clean minus
    corrupted), which restoring everything would bring back."""
    mean = np.asarray(localization["mean_effect"], dtype=float)
    trained = set(localization.get("trained_layers", []))
    layers = np.arange(len(mean))
    with figure(min(10.0, 3.0 + 0.22 * len(mean)), 3.2) as (fig, (ax,)):
        colors = [STATUS_COLOR["extractable"] if layer in trained else "white" for layer in layers]
        ax.bar(layers, mean, color=colors, edgecolor=STATUS_COLOR["extractable"], lw=1, width=0.75, zorder=2)
        for row in localization.get("sequences", []):
            ax.plot(layers, row["effect"], ".", color=BEFORE_COLOR, ms=3, alpha=0.6, zorder=3)
        ax.axhline(0, color="#424242", lw=0.6)
        clean, corrupted = localization.get("clean"), localization.get("corrupted")
        if clean is not None and corrupted is not None:
            ax.axhline(clean - corrupted, color="#424242", ls="--", lw=0.8)
            ax.plot([], [], color="#424242", ls="--", lw=0.8, label="clean − corrupted")
        ax.add_patch(Rectangle((0, 0), 0, 0, color=STATUS_COLOR["extractable"], label="unlearned (top ranked)"))
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="white", edgecolor=STATUS_COLOR["extractable"],
                               label="other layers"))
        ax.plot([], [], ".", color=BEFORE_COLOR, label="one sequence")
        ax.set_xticks(layers, [str(layer) for layer in layers], fontsize=7 if len(mean) > 20 else 8)
        ax.set_xlabel("layer (its MLP output restored)")
        ax.set_ylabel("probability restored")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return to_data_uri(fig)


def compare_tradeoff(points: list[dict]) -> str:
    """One marker per run: utility loss against forget mean MA after; filled when the target was reached."""
    with figure(6.0, 3.6) as (fig, (ax,)):
        for point in points:
            if point["utility_loss"] is None or point["mean_ma"] is None:
                continue
            x, y = 100 * point["utility_loss"], point["mean_ma"]
            color = STATUS_COLOR["in_band"] if point["target_reached"] else STATUS_COLOR["extractable"]
            ax.plot(x, y, "o", ms=8, color=color, mfc=color if point["target_reached"] else "white")
            ax.annotate(short(point["name"]), (x, y), xytext=(5, 3), textcoords="offset points", fontsize=8)
        ax.plot([], [], "o", color=STATUS_COLOR["in_band"], label="target reached")
        ax.plot([], [], "o", mfc="white", color=STATUS_COLOR["extractable"], label="target not reached")
        ax.set_xlabel("utility loss (%; lower is better)")
        ax.set_ylabel("forget mean MA after")
        ax.legend(loc="best")
        ax.margins(0.15)
        return to_data_uri(fig)


def _limits(band: dict | None) -> tuple[float | None, float | None]:
    if not band:
        return None, None
    return band.get("lower"), band.get("upper")


def _last_finite(series: np.ndarray) -> int | None:
    finite = np.flatnonzero(np.isfinite(series))
    return int(finite[-1]) if finite.size else None
