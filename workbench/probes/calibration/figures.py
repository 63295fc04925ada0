"""Figures of the ``calibration`` table: reliability diagrams and calibration/discrimination over steps.

All builders take the table :meth:`Store.table("calibration") <workbench.Store.table>` returns. Per-step
builders keep the same traces in the same order at every step (empty bins are gaps, not missing traces), so
:func:`workbench.figures.with_slider` can animate them.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import color, nearest_step

METRIC_LABELS = {"ece": "ECE", "mce": "MCE", "brier": "Brier score", "nll": "NLL (nats)", "auroc": "AUROC",
                 "auprc": "AUPRC", "accuracy": "accuracy", "confidence": "mean confidence",
                 "overconfidence": "confidence − accuracy", "ece_quantile": "ECE (equal-mass bins)"}


def _groups(table: pl.DataFrame, groups: Sequence[str] | None) -> list[str]:
    present = table["group"].unique(maintain_order=True).to_list()
    if groups is None:
        named = [g for g in present if g != "all"]
        return named or present
    missing = [g for g in groups if g not in present]
    if missing:
        raise InputError(f"the calibration table has no group {missing[0]!r}; it has {present}")
    return list(groups)


def _check(table: pl.DataFrame) -> None:
    if table.is_empty() or "metric" not in table.columns:
        raise InputError("the calibration table is empty; measure the run with Calibration() first")
    if "bin" not in table.columns:
        raise InputError("this table has no 'bin' column: it is not the table of the 'calibration' measurement")


def _x(steps: Sequence[int], log_x: bool) -> list[int]:
    return [max(s, 1) for s in steps] if log_x else list(steps)


def _values(rows: pl.DataFrame) -> list:
    """The value column with NaN as None: a gap in the line (undefined AUROC), and JSON that widgets accept."""
    return [None if v is None or v != v else v for v in rows["value"].to_list()]


def _scalar(table: pl.DataFrame, metric: str, group: str) -> pl.DataFrame:
    rows = table.filter((pl.col("metric") == metric) & (pl.col("group") == group) & pl.col("bin").is_null())
    return rows.sort("step")


# --- reliability diagram ---------------------------------------------------------------------------------------
def _add_reliability(fig: go.Figure, table: pl.DataFrame, step: int, groups: list[str], row=None, col=None) -> str:
    """Bars of accuracy per bin (one set per group), diamonds at each bin's mean confidence, and the
    diagonal of perfect calibration. Returns a short ECE/AUROC summary for the title."""
    at = table.filter((pl.col("step") == step) & pl.col("bin").is_not_null())
    bins = sorted(at["bin"].unique().to_list())
    n_groups = len(groups)
    where = dict(row=row, col=col) if row is not None else {}
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                             line=dict(color="black", dash="dash", width=1), hoverinfo="skip", showlegend=True),
                  **where)
    summary = []
    for i, g in enumerate(groups):
        d = at.filter(pl.col("group") == g)
        wide = {m: {b: None for b in bins} for m in ("count", "confidence", "accuracy", "lower", "upper")}
        for metric, b, v in d.select("metric", "bin", "value").iter_rows():
            wide[metric.removeprefix("reliability_")][b] = None if v is None or v != v else v
        lower = [wide["lower"][b] for b in bins]
        upper = [wide["upper"][b] for b in bins]
        acc = [wide["accuracy"][b] for b in bins]
        conf = [wide["confidence"][b] for b in bins]
        count = [int(wide["count"][b] or 0) for b in bins]
        # Each group takes its share of the bin's width, side by side.
        width = [((u - lo) / n_groups * 0.9) if u is not None and lo is not None else 0 for lo, u in zip(lower, upper)]
        left = [(lo + (u - lo) * (0.05 + 0.9 * i / n_groups)) if u is not None and lo is not None else None
                for lo, u in zip(lower, upper)]
        x = [lo + w / 2 if lo is not None else None for lo, w in zip(left, width)]
        fig.add_trace(go.Bar(x=x, y=acc, width=width, name=f"{g}: accuracy", legendgroup=g,
                             marker=dict(color=color(g, i), opacity=0.75),
                             customdata=list(zip(count, conf)),
                             hovertemplate="accuracy %{y:.3f}<br>mean confidence %{customdata[1]:.3f}"
                                           "<br>%{customdata[0]} answers<extra>" + g + "</extra>"), **where)
        fig.add_trace(go.Scatter(x=x, y=conf, mode="markers", name=f"{g}: mean confidence", legendgroup=g,
                                 marker=dict(symbol="diamond", size=7, color=color(g, i),
                                             line=dict(color="black", width=1)),
                                 hoverinfo="skip"), **where)
        scal = table.filter((pl.col("step") == step) & (pl.col("group") == g) & pl.col("bin").is_null())
        vals = dict(scal.select("metric", "value").iter_rows())
        if "ece" in vals:
            auroc = vals.get("auroc")
            auroc_s = f"{auroc:.2f}" if auroc is not None and auroc == auroc else "undefined"
            summary.append(f"{g} ECE {vals['ece']:.3f}, AUROC {auroc_s}")
    return "; ".join(summary)


def reliability_diagram(table: pl.DataFrame, step: int | None = None, groups: Sequence[str] | None = None,
                        width: int | None = None, height: int = 380) -> go.Figure:
    """Reliability diagram at one checkpoint: per confidence bin, the accuracy (bars) against the mean
    confidence (diamonds) and the diagonal; bars below the diagonal are over-confident bins."""
    _check(table)
    step = nearest_step(table["step"].unique().to_list(), step)
    groups = _groups(table, groups)
    fig = go.Figure()
    summary = _add_reliability(fig, table, step, groups)
    fig.update_xaxes(title_text="confidence", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    fig.update_layout(title=dict(text=f"reliability at step {step}<br><sup>{summary}</sup>", x=0.01),
                      height=height, width=width, barmode="overlay", margin=dict(t=60, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.2))
    return fig


# --- over steps ------------------------------------------------------------------------------------------------
def _add_over_steps(fig: go.Figure, table: pl.DataFrame, metric: str, groups: list[str], log_x: bool,
                    row=None, col=None, showlegend: bool = True) -> None:
    where = dict(row=row, col=col) if row is not None else {}
    for i, g in enumerate(groups):
        d = _scalar(table, metric, g)
        x = _x(d["step"].to_list(), log_x)
        c = color(g, i)
        lo, hi = _scalar(table, f"{metric}_low", g), _scalar(table, f"{metric}_high", g)
        if not lo.is_empty() and not hi.is_empty():
            xb = _x(lo["step"].to_list(), log_x)
            fig.add_trace(go.Scatter(x=xb, y=_values(hi), mode="lines", line=dict(width=0), showlegend=False,
                                     legendgroup=g, hoverinfo="skip"), **where)
            fig.add_trace(go.Scatter(x=xb, y=_values(lo), mode="lines", line=dict(width=0), fill="tonexty",
                                     fillcolor=_rgba(c, 0.18), showlegend=False, legendgroup=g, hoverinfo="skip"),
                          **where)
        label = METRIC_LABELS.get(metric, metric)
        fig.add_trace(go.Scatter(x=x, y=_values(d), mode="lines+markers", name=g, legendgroup=g,
                                 showlegend=showlegend, line=dict(color=c), marker=dict(size=4),
                                 hovertemplate=f"{label} %{{y:.3f}}<br>step %{{x}}<extra>{g}</extra>"),
                      **where)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def calibration_over_steps(table: pl.DataFrame, metrics: Sequence[str] = ("ece", "auroc"),
                           groups: Sequence[str] | None = None, step: int | None = None, log_x: bool = True,
                           width: int | None = None, height: int = 380) -> go.Figure:
    """Each metric over checkpoints, one line per group (shaded: the bootstrap interval where measured),
    with a dotted line at ``step``."""
    _check(table)
    groups = _groups(table, groups)
    known = set(table["metric"].unique().to_list())
    for m in metrics:
        if m not in known:
            scalars = sorted(k for k in known if not k.startswith("reliability"))
            raise InputError(f"the calibration table has no metric {m!r}; it has {scalars}")
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics])
    for r, m in enumerate(metrics, start=1):
        _add_over_steps(fig, table, m, groups, log_x, row=r, col=1, showlegend=r == 1)
        if m == "auroc":  # chance level
            fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), row=r, col=1)
    if step is not None:
        for r in range(1, len(metrics) + 1):
            fig.add_vline(x=max(step, 1) if log_x else step, line=dict(color="black", dash="dot", width=1),
                          row=r, col=1)
    fig.update_xaxes(type="log" if log_x else "linear")
    fig.update_xaxes(title_text="step", row=len(metrics), col=1)
    fig.update_layout(height=height, width=width, margin=dict(t=40, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.15))
    return fig


def calibration_at_step(table: pl.DataFrame, step: int | None = None, groups: Sequence[str] | None = None,
                        log_x: bool = True) -> go.Figure:
    """One figure for reports: the reliability diagram at ``step`` beside ECE and AUROC over steps (with the
    step marked). Same traces at every step, for :func:`workbench.figures.with_slider`."""
    _check(table)
    step = nearest_step(table["step"].unique().to_list(), step)
    groups = _groups(table, groups)
    fig = make_subplots(rows=2, cols=2, column_widths=[0.5, 0.5], specs=[[{"rowspan": 2}, {}], [None, {}]],
                        horizontal_spacing=0.1, vertical_spacing=0.14,
                        subplot_titles=("reliability diagram", "ECE", "AUROC"))
    summary = _add_reliability(fig, table, step, groups, row=1, col=1)
    _add_over_steps(fig, table, "ece", groups, log_x, row=1, col=2, showlegend=False)
    _add_over_steps(fig, table, "auroc", groups, log_x, row=2, col=2, showlegend=False)
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), row=2, col=2)  # AUROC at chance
    x = max(step, 1) if log_x else step
    for r in (1, 2):
        fig.add_vline(x=x, line=dict(color="black", dash="dot", width=1), row=r, col=2)
    fig.update_xaxes(title_text="confidence", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_xaxes(type="log" if log_x else "linear", row=1, col=2)
    fig.update_xaxes(type="log" if log_x else "linear", title_text="step", row=2, col=2)
    fig.update_layout(title=dict(text=f"calibration at step {step}<br><sup>{summary}</sup>", x=0.01),
                      height=480, barmode="overlay", margin=dict(t=80, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.12))
    return fig


# --- report section --------------------------------------------------------------------------------------------
def report_section(store, run=None):
    """The demo report's calibration section (registered in :data:`workbench.report.SECTIONS`)."""
    from workbench.probes.calibration.measurement import transition_summary
    from workbench.report import Section

    if "calibration" not in store.probes():
        return None
    table = store.table("calibration")
    if table.is_empty():
        return None
    from workbench import figures

    steps = sorted(table["step"].unique().to_list())
    sec = Section("Calibration and discrimination")
    sec.add(
        "Confidence is the probability of the model's answer (argmax token). Calibration: ECE over 10 "
        "equal-width bins, the share-weighted gap between accuracy and mean confidence (0 is perfect). "
        "Discrimination: AUROC, the chance that a right answer gets higher confidence than a wrong one "
        "(0.5 is chance). Shaded bands are 95% bootstrap intervals."
    )
    groups = table["group"].unique().to_list()
    if "test" in groups:
        try:
            summ = transition_summary(table, group="test")
        except InputError:
            summ = None
        if summ is not None:
            parts = []
            for r in summ.iter_rows(named=True):
                auroc = r.get("test_auroc")
                auroc_s = "undefined" if auroc is None or auroc != auroc else f"{auroc:.2f}"
                parts.append(f"{r['landmark']} (step {r['step']}): test accuracy {r['test_accuracy']:.2f}, mean "
                             f"confidence {r['test_confidence']:.2f}, ECE {r['test_ece']:.3f}, AUROC {auroc_s}")
            sec.add("Held-out (test) answers at the landmarks of the run: " + "; ".join(parts) + ".")
    sec.add(calibration_over_steps(table, metrics=("ece", "auroc", "overconfidence")
                                   if "overconfidence" in table["metric"].unique().to_list() else ("ece", "auroc"),
                                   height=560))
    sec.add(figures.with_slider(lambda s: calibration_at_step(table, step=s), steps))
    return sec


__all__ = ["calibration_at_step", "calibration_over_steps", "reliability_diagram", "report_section"]
