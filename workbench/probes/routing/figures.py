"""Figures of the ``routing`` table: routing statistics per MoE layer over checkpoints and at one checkpoint,
and the report's routing section."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.figures import (ALL_STEPS, PALETTE, Section, color, nearest_step, step_axis, step_line, step_x,
                               value_at, with_slider)
from workbench.samples import OVERALL


def routing_entropy_over_steps(routing: pl.DataFrame, metric: str = "load_entropy", group: str = OVERALL,
                               step: int | None = None, log_x: bool = True) -> go.Figure:
    """One line per MoE layer: a routing statistic over all steps; with ``step``, each layer's value there as a
    point and in the title."""
    df = routing.filter((pl.col("metric") == metric) & (pl.col("group") == group)).sort("step")
    all_steps = sorted(routing["step"].unique().to_list())
    fig = go.Figure()
    at = []
    for i, layer in enumerate(sorted(df["layer"].unique().to_list())):
        d = df.filter(pl.col("layer") == layer)
        steps, values = d["step"].to_list(), d["value"].to_list()
        c = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=step_x(steps, log_x, all_steps), y=values, mode="lines", name=f"layer {layer}",
                                 legendgroup=f"layer {layer}", line=dict(color=c)))
        if step is not None:
            v = value_at(steps, values, step)
            fig.add_trace(go.Scatter(x=step_x([step], log_x, all_steps), y=[v], mode="markers", showlegend=False,
                                     legendgroup=f"layer {layer}", hoverinfo="skip",
                                     marker=dict(size=9, color=c, line=dict(color="black", width=1))))
            if v is not None:
                at.append(f"L{layer} {v:.2f}")
    name = metric.replace("_", " ")
    if step is not None:
        step_line(fig, step, all_steps, log_x)
        title = f"{name}, {group}, per layer: step {step}: " + ", ".join(at)
    else:
        title = f"{name}, {group}, per layer, {ALL_STEPS}"
    step_axis(fig, all_steps, log_x)
    fig.update_yaxes(title_text=f"{name} (nats)")
    fig.update_layout(height=320, margin=dict(t=40, b=40, l=60, r=20), title=dict(text=title, x=0.01))
    return fig


def routing_at_step(routing: pl.DataFrame, step: int | None = None, group: str = OVERALL) -> go.Figure:
    """At one checkpoint: expert-load entropy per layer and group (bars), and each expert's load share per
    layer (heatmap)."""
    step = nearest_step(routing["step"].unique().to_list(), step)
    at = routing.filter(pl.col("step") == step)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=("expert-load entropy per layer", f"expert load share ({group})"))
    ent = at.filter(pl.col("metric") == "load_entropy").sort("layer")
    for i, g in enumerate(x for x in ent["group"].unique(maintain_order=True).to_list()):
        d = ent.filter(pl.col("group") == g)
        fig.add_trace(go.Bar(x=[f"L{v}" for v in d["layer"].to_list()], y=d["value"].to_list(), name=g,
                             marker_color=color(g, i)), row=1, col=1)
    load = at.filter((pl.col("metric") == "expert_load") & (pl.col("group") == group))
    layers = sorted(load["layer"].unique().to_list())
    experts = sorted(load["expert"].unique().to_list()) if "expert" in load.columns else []
    z = [[None] * len(experts) for _ in layers]
    for layer, e, v in load.select("layer", "expert", "value").iter_rows():
        z[layers.index(layer)][experts.index(e)] = v
    fig.add_trace(go.Heatmap(z=z, x=[f"E{e}" for e in experts], y=[f"L{v}" for v in layers], zmin=0,
                             zmax=max(0.5, max((v for r in z for v in r if v is not None), default=0.5)),
                             colorscale="Viridis", colorbar=dict(title="share", x=1.02), showscale=True),
                  row=1, col=2)
    n_exp = max(len(experts), 1)
    fig.update_yaxes(range=[0, math.log(n_exp) * 1.05], title_text="nats", row=1, col=1)
    fig.update_layout(height=360, barmode="group", margin=dict(t=40, b=40, l=50, r=20),
                      title=dict(text=f"routing at step {step}", x=0.01, y=0.99),
                      legend=dict(orientation="h", x=0, y=-0.15))
    return fig


def report_section(routing: pl.DataFrame) -> Section:
    """Expert-load entropy per layer over checkpoints, and the routing at each checkpoint on a slider."""
    steps = sorted(routing["step"].unique().to_list())
    sec = Section("Routing statistics")
    sec.add(
        "Expert-load entropy is the entropy of the share of top-k choices each expert receives (log of the "
        "number of experts when the load is even); importance entropy is that of the mean router softmax."
    )
    sec.add(with_slider(lambda s: routing_entropy_over_steps(routing, "load_entropy", OVERALL, step=s), steps))
    sec.add(with_slider(lambda s: routing_at_step(routing, step=s, group=OVERALL), steps))
    return sec


__all__ = ["report_section", "routing_at_step", "routing_entropy_over_steps"]
