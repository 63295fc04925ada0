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
from workbench.figures import (ALL_STEPS, Section, color, nearest_step, pick_groups, rgba, step_axis, step_line,
                               step_x, value_at, with_slider)

METRIC_LABELS = {"ece": "ECE", "mce": "MCE", "brier": "Brier score", "nll": "NLL (nats)", "auroc": "AUROC",
                 "auprc": "AUPRC", "accuracy": "accuracy", "confidence": "mean confidence",
                 "overconfidence": "confidence − accuracy", "ece_quantile": "ECE (equal-mass bins)"}


def _check(table: pl.DataFrame) -> None:
    if table.is_empty() or "metric" not in table.columns:
        raise InputError("the calibration table is empty; measure the run with Calibration() first")
    if "bin" not in table.columns:
        raise InputError("this table has no 'bin' column: it is not the table of the 'calibration' measurement")


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
    groups = pick_groups(table, groups, "calibration")
    fig = go.Figure()
    summary = _add_reliability(fig, table, step, groups)
    fig.update_xaxes(title_text="confidence", range=[0, 1])
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    fig.update_layout(title=dict(text=f"reliability at step {step}<br><sup>{summary}</sup>", x=0.01),
                      height=height, width=width, barmode="overlay", margin=dict(t=60, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.2))
    return fig


# --- over steps ------------------------------------------------------------------------------------------------
def _band(steps: list[int], low: list, high: list, x: list) -> tuple[list, list]:
    """The interval as closed polygons, one per run of steps where both ends are defined, separated by None:
    a band never spans a step where the interval is missing (``fill="tonexty"`` would draw a wedge across)."""
    xs, ys = [], []
    run: list[int] = []
    for i in range(len(steps) + 1):
        ok = i < len(steps) and low[i] is not None and high[i] is not None
        if ok:
            run.append(i)
            continue
        if run:
            xs += [x[j] for j in run] + [x[j] for j in reversed(run)] + [None]
            ys += [high[j] for j in run] + [low[j] for j in reversed(run)] + [None]
        run = []
    return xs, ys


def _add_over_steps(fig: go.Figure, table: pl.DataFrame, metric: str, groups: list[str], log_x: bool,
                    all_steps: list[int], step: int | None = None, row=None, col=None,
                    showlegend: bool = True) -> list[str]:
    """Per group: the bootstrap band (if measured), the line, and with ``step`` the value there as a point.
    The same traces at every step. Returns "group value" strings at ``step`` for the title."""
    where = dict(row=row, col=col) if row is not None else {}
    label = METRIC_LABELS.get(metric, metric)
    at = []
    for i, g in enumerate(groups):
        d = _scalar(table, metric, g)
        steps, values = d["step"].to_list(), _values(d)
        x = step_x(steps, log_x, all_steps)
        c = color(g, i)
        lo, hi = _scalar(table, f"{metric}_low", g), _scalar(table, f"{metric}_high", g)
        if not lo.is_empty() and not hi.is_empty():
            band_steps = lo["step"].to_list()
            high = dict(zip(hi["step"].to_list(), _values(hi)))
            bx, by = _band(band_steps, _values(lo), [high.get(s) for s in band_steps],
                           step_x(band_steps, log_x, all_steps))
            fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line=dict(width=0), fill="toself",
                                     fillcolor=rgba(c, 0.18), showlegend=False, legendgroup=g, hoverinfo="skip",
                                     name=f"{g}: 95% interval"), **where)
        fig.add_trace(go.Scatter(x=x, y=values, mode="lines+markers", name=g, legendgroup=g,
                                 showlegend=showlegend, line=dict(color=c), marker=dict(size=4),
                                 customdata=steps,
                                 hovertemplate=f"{label} %{{y:.3f}}<br>step %{{customdata}}<extra>{g}</extra>"),
                      **where)
        if step is not None:
            v = value_at(steps, values, step)
            fig.add_trace(go.Scatter(x=step_x([step], log_x, all_steps), y=[v], mode="markers", showlegend=False,
                                     legendgroup=g, hoverinfo="skip",
                                     marker=dict(size=9, color=c, line=dict(color="black", width=1))), **where)
            at.append(f"{g} {v:.3f}" if v is not None else f"{g} undefined")
    return at


def calibration_over_steps(table: pl.DataFrame, metrics: Sequence[str] = ("ece", "auroc"),
                           groups: Sequence[str] | None = None, step: int | None = None, log_x: bool = True,
                           width: int | None = None, height: int = 380) -> go.Figure:
    """Each metric over all checkpoints, one line per group (shaded: the bootstrap interval where measured);
    with ``step``, a dotted line and each line's value there."""
    _check(table)
    groups = pick_groups(table, groups, "calibration")
    known = set(table["metric"].unique().to_list())
    for m in metrics:
        if m not in known:
            scalars = sorted(k for k in known if not k.startswith("reliability"))
            raise InputError(f"the calibration table has no metric {m!r}; it has {scalars}")
    all_steps = sorted(table["step"].unique().to_list())
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics])
    at = []
    for r, m in enumerate(metrics, start=1):
        vals = _add_over_steps(fig, table, m, groups, log_x, all_steps, step, row=r, col=1, showlegend=r == 1)
        at.append(f"{METRIC_LABELS.get(m, m)} " + ", ".join(vals))
        if m == "auroc":  # chance level
            fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), row=r, col=1)
        step_axis(fig, all_steps, log_x, title="step" if r == len(metrics) else None, row=r, col=1)
        if step is not None:
            step_line(fig, step, all_steps, log_x, row=r, col=1)
    title = (f"step {step}: " + "; ".join(at)) if step is not None else \
        f"calibration and discrimination, {ALL_STEPS} (shaded: 95% bootstrap intervals)"
    fig.update_layout(height=height, width=width, margin=dict(t=60, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.15), title=dict(text=title, x=0.01, font=dict(size=13)))
    return fig


def calibration_at_step(table: pl.DataFrame, step: int | None = None, groups: Sequence[str] | None = None,
                        log_x: bool = True) -> go.Figure:
    """One figure for reports: the reliability diagram at ``step`` beside ECE and AUROC over steps (with the
    step marked). Same traces at every step, for :func:`workbench.figures.with_slider`."""
    _check(table)
    step = nearest_step(table["step"].unique().to_list(), step)
    groups = pick_groups(table, groups, "calibration")
    fig = make_subplots(rows=2, cols=2, column_widths=[0.5, 0.5], specs=[[{"rowspan": 2}, {}], [None, {}]],
                        horizontal_spacing=0.1, vertical_spacing=0.14,
                        subplot_titles=("reliability diagram", "ECE", "AUROC"))
    summary = _add_reliability(fig, table, step, groups, row=1, col=1)
    all_steps = sorted(table["step"].unique().to_list())
    for r, m in ((1, "ece"), (2, "auroc")):
        _add_over_steps(fig, table, m, groups, log_x, all_steps, step, row=r, col=2, showlegend=False)
        step_line(fig, step, all_steps, log_x, row=r, col=2)
        step_axis(fig, all_steps, log_x, title="step" if r == 2 else None, row=r, col=2)
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), row=2, col=2)  # AUROC at chance
    fig.update_xaxes(title_text="confidence", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_layout(title=dict(text=f"calibration at step {step}<br><sup>{summary}</sup>", x=0.01),
                      height=480, barmode="overlay", margin=dict(t=80, b=40, l=50, r=20),
                      legend=dict(orientation="h", y=-0.12))
    return fig


# --- report section --------------------------------------------------------------------------------------------
def report_section(table: pl.DataFrame, summary: pl.DataFrame | None = None) -> Section:
    """The report's calibration section: the test group at the run's landmarks (``summary``, from
    :func:`~workbench.probes.calibration.measurement.transition_summary`), calibration and discrimination over
    checkpoints, and the reliability diagram on a checkpoint slider."""
    steps = sorted(table["step"].unique().to_list())
    sec = Section("Calibration and discrimination")
    sec.add(
        "Confidence is the probability of the model's answer (argmax token). Calibration: ECE over 10 "
        "equal-width bins, the share-weighted gap between accuracy and mean confidence (0 is perfect). "
        "Discrimination: AUROC, the chance that a right answer gets higher confidence than a wrong one "
        "(0.5 is chance). Shaded bands are 95% bootstrap intervals."
    )
    if summary is not None:
        parts = []
        for r in summary.iter_rows(named=True):
            auroc = r.get("test_auroc")
            auroc_s = "undefined" if auroc is None or auroc != auroc else f"{auroc:.2f}"
            parts.append(f"{r['landmark']} (step {r['step']}): test accuracy {r['test_accuracy']:.2f}, mean "
                         f"confidence {r['test_confidence']:.2f}, ECE {r['test_ece']:.3f}, AUROC {auroc_s}")
        sec.add("Held-out (test) answers at the landmarks of the run: " + "; ".join(parts) + ".")
    sec.add(calibration_over_steps(table, metrics=("ece", "auroc", "overconfidence")
                                   if "overconfidence" in table["metric"].unique().to_list() else ("ece", "auroc"),
                                   height=560))
    sec.add(with_slider(lambda s: calibration_at_step(table, step=s), steps))
    return sec


__all__ = ["calibration_at_step", "calibration_over_steps", "reliability_diagram", "report_section"]
