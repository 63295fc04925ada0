"""Figures of the ``probes`` table (linear probes per block and checkpoint): store tables in, plotly figures out.

- :func:`probe_overview`: a layer × checkpoint heatmap of probe accuracy (selectivity and control accuracy
  on hover) beside the model's own accuracy over the same checkpoints, with the chosen checkpoint marked;
  the same for training runs and forgetting runs.
- :func:`probe_layers`: probe accuracy per layer at chosen checkpoints (before and after forgetting).
- :func:`report_section`: the report's section.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import PALETTE, Section, nearest_step, value_at, with_slider
from workbench.samples import OVERALL


def check_task(table: pl.DataFrame, group: str | None) -> str:
    """``group`` (default: the first task) after checking that the table holds it."""
    if table.is_empty() or "metric" not in table.columns:
        raise InputError("the probes table is empty; measure the run with the 'probes' measurement first")
    groups = tasks(table)
    if group is None:
        return groups[0]
    if group not in groups:
        raise InputError(f"the probes table has no task {group!r}; it has {groups}")
    return group


def tasks(table: pl.DataFrame) -> list[str]:
    """The tasks (groups) a probes table holds, in order of appearance."""
    return table.filter(pl.col("layer").is_not_null())["group"].unique(maintain_order=True).to_list()


def _grid(table: pl.DataFrame, group: str, metric: str, steps: list[int], layers: list[int]) -> list[list]:
    z = [[None] * len(steps) for _ in layers]
    d = table.filter((pl.col("group") == group) & (pl.col("metric") == metric) & pl.col("layer").is_not_null())
    for s, layer, v in d.select("step", "layer", "value").iter_rows():
        if s in steps and layer in layers:
            z[layers.index(layer)][steps.index(s)] = v
    return z


def probe_overview(table: pl.DataFrame, group: str | None = None, step: int | None = None,
                   metric: str = "accuracy") -> go.Figure:
    """Probe ``metric`` per layer (rows) and checkpoint (columns), beside the model's own accuracy and the best
    probe's accuracy over the same checkpoints; ``step`` is marked in both panels."""
    group = check_task(table, group)
    d = table.filter(pl.col("group") == group)
    steps = sorted(d["step"].unique().to_list())
    layers = sorted(d["layer"].drop_nulls().unique().to_list())
    step = nearest_step(steps, step)
    z = _grid(d, group, metric, steps, layers)
    extra = [m for m in ("selectivity", "control_accuracy", "train_accuracy") if m in d["metric"].unique().to_list()]
    grids = [_grid(d, group, m, steps, layers) for m in extra]
    custom = [[[g[i][j] for g in grids] for j in range(len(steps))] for i in range(len(layers))]
    hover = "step %{x}<br>layer %{y}<br>" + metric.replace("_", " ") + " %{z:.3f}"
    for k, m in enumerate(extra):
        hover += f"<br>{m.replace('_', ' ')} %{{customdata[{k}]:.3f}}"
    xs = [str(s) for s in steps]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.1,
                        subplot_titles=(f"probe {metric.replace('_', ' ')} per layer", "accuracy over checkpoints"))
    fig.add_trace(go.Heatmap(z=z, x=xs, y=[f"L{v}" for v in layers], customdata=custom, zmin=0, zmax=1,
                             colorscale="Viridis", hovertemplate=hover + "<extra></extra>",
                             colorbar=dict(title=metric.split("_")[0], x=0.53, len=0.9)), row=1, col=1)
    model = d.filter((pl.col("metric") == "model_accuracy") & pl.col("layer").is_null()).sort("step")
    fig.add_trace(go.Scatter(x=[str(s) for s in model["step"]], y=model["value"].to_list(), mode="lines+markers",
                             name="model (top-1)", line=dict(color="#d62728")), row=1, col=2)
    acc = d.filter((pl.col("metric") == metric) & pl.col("layer").is_not_null())
    best = acc.group_by("step").agg(pl.col("value").max()).sort("step")
    fig.add_trace(go.Scatter(x=[str(s) for s in best["step"]], y=best["value"].to_list(), mode="lines+markers",
                             name="best probe", line=dict(color="#1f77b4")), row=1, col=2)
    if "selectivity" in extra:
        sel = d.filter((pl.col("metric") == "selectivity") & pl.col("layer").is_not_null())
        sel = sel.group_by("step").agg(pl.col("value").max()).sort("step")
        fig.add_trace(go.Scatter(x=[str(s) for s in sel["step"]], y=sel["value"].to_list(), mode="lines",
                                 name="best selectivity", line=dict(color="#2ca02c", dash="dot")), row=1, col=2)
    i = steps.index(step)
    fig.add_shape(type="rect", x0=i - 0.5, x1=i + 0.5, y0=-0.5, y1=len(layers) - 0.5, xref="x", yref="y",
                  line=dict(color="white", width=2))
    fig.add_shape(type="line", x0=i, x1=i, y0=0, y1=1, xref="x2", yref="y2 domain",
                  line=dict(color="black", dash="dot", width=1))
    m_at = value_at(model["step"].to_list(), model["value"].to_list(), step)
    b_at = value_at(best["step"].to_list(), best["value"].to_list(), step)
    fig.add_trace(go.Scatter(x=[str(step), str(step)], y=[m_at, b_at], mode="markers", showlegend=False,
                             hoverinfo="skip", marker=dict(size=10, color=["#d62728", "#1f77b4"],
                                                           line=dict(color="black", width=1))), row=1, col=2)
    at = acc.filter(pl.col("step") == step).sort("value", descending=True)
    parts = [f"model accuracy {m_at:.2f}" if m_at is not None else ""]
    if not at.is_empty():
        parts.append(f"best probe {at['value'][0]:.2f} (block {at['layer'][0]})")
    task = f"task {group}, " if group != OVERALL else ""
    fig.update_xaxes(title_text="checkpoint step", type="category")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=2)
    fig.update_layout(height=380, margin=dict(t=60, b=50, l=50, r=20), legend=dict(orientation="h", y=-0.25, x=0.6),
                      title=dict(text=f"linear probes, {task}step {step}: " + ", ".join(p for p in parts if p),
                                 x=0.01, y=0.98))
    return fig


def probe_layers(table: pl.DataFrame, group: str | None = None, steps: Sequence[int] | None = None,
                 labels: Sequence[str] | None = None, control: bool = True) -> go.Figure:
    """Probe accuracy per layer at a few checkpoints (default: the first and the last), with the control-task
    accuracy dotted and the model's own accuracy as a horizontal mark."""
    group = check_task(table, group)
    d = table.filter(pl.col("group") == group)
    all_steps = sorted(d["step"].unique().to_list())
    steps = [nearest_step(all_steps, s) for s in (steps or [all_steps[0], all_steps[-1]])]
    labels = list(labels) if labels is not None else [f"step {s}" for s in steps]
    fig = go.Figure()
    for i, (s, lab) in enumerate(zip(steps, labels)):
        c = PALETTE[i % len(PALETTE)]
        at = d.filter((pl.col("step") == s) & pl.col("layer").is_not_null()).sort("layer")
        acc = at.filter(pl.col("metric") == "accuracy")
        fig.add_trace(go.Scatter(x=acc["layer"].to_list(), y=acc["value"].to_list(), mode="lines+markers",
                                 name=f"probe, {lab}", line=dict(color=c)))
        ctrl = at.filter(pl.col("metric") == "control_accuracy")
        if control and ctrl.height:
            fig.add_trace(go.Scatter(x=ctrl["layer"].to_list(), y=ctrl["value"].to_list(), mode="lines",
                                     name=f"control task, {lab}", line=dict(color=c, dash="dot")))
        model = d.filter((pl.col("step") == s) & (pl.col("metric") == "model_accuracy"))
        if model.height:
            fig.add_hline(y=model["value"][0], line=dict(color=c, dash="dash", width=1),
                          annotation_text=f"model, {lab}", annotation_position="bottom right")
    fig.update_xaxes(title_text="layer (block)", dtick=1)
    fig.update_yaxes(title_text="accuracy (test split)", range=[0, 1.02])
    fig.update_layout(height=340, margin=dict(t=40, b=40, l=60, r=20), title=f"{group}: probes per layer")
    return fig


def report_section(table: pl.DataFrame) -> Section:
    """The report's section: a probe overview per task, with a checkpoint slider."""
    steps = sorted(table["step"].unique().to_list())
    sec = Section("Linear probes")
    sec.add("Each heatmap shows the test accuracy of a logistic-regression probe on the last-token hidden "
            "state after each block (rows) at each checkpoint (columns); hover for selectivity (accuracy "
            "minus a control task's, Hewitt & Liang 2019). Beside it, the model's own accuracy and the best "
            "probe's over the same checkpoints.")
    for g in tasks(table):
        sec.add(with_slider(lambda s, g=g: probe_overview(table, g, step=s), steps))
    return sec


__all__ = ["check_task", "probe_layers", "probe_overview", "report_section", "tasks"]
