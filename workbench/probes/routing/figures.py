"""Figures of the ``routing`` table: routing statistics per MoE layer over checkpoints and at one checkpoint,
and the report's routing section."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.figures import PALETTE, color, nearest_step, with_slider
from workbench.report import Section
from workbench.store import Store


def routing_entropy_over_steps(routing: pl.DataFrame, metric: str = "load_entropy", group: str = "all",
                               step: int | None = None, log_x: bool = True) -> go.Figure:
    """One line per MoE layer: a routing statistic over steps."""
    df = routing.filter((pl.col("metric") == metric) & (pl.col("group") == group)).sort("step")
    fig = go.Figure()
    for i, layer in enumerate(sorted(df["layer"].unique().to_list())):
        d = df.filter(pl.col("layer") == layer)
        x = [max(s, 1) for s in d["step"].to_list()] if log_x else d["step"].to_list()
        fig.add_trace(go.Scatter(x=x, y=d["value"].to_list(), mode="lines", name=f"layer {layer}",
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    if step is not None:
        fig.add_vline(x=max(step, 1) if log_x else step, line=dict(color="black", dash="dot", width=1))
    fig.update_xaxes(title_text="step", type="log" if log_x else "linear")
    fig.update_yaxes(title_text=f"{metric.replace('_', ' ')} (nats)")
    fig.update_layout(height=320, margin=dict(t=30, b=40, l=60, r=20), title=f"{metric.replace('_', ' ')}, {group}")
    return fig


def routing_at_step(routing: pl.DataFrame, step: int | None = None, group: str = "all") -> go.Figure:
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
    import math

    fig.update_yaxes(range=[0, math.log(n_exp) * 1.05], title_text="nats", row=1, col=1)
    fig.update_layout(height=360, barmode="group", margin=dict(t=40, b=40, l=50, r=20),
                      title=dict(text=f"routing at step {step}", x=0.01, y=0.99),
                      legend=dict(orientation="h", x=0, y=-0.15))
    return fig


def routing_section(store: Store, run=None) -> Section | None:
    if "routing" not in store.probes():
        return None
    routing = store.table("routing")
    steps = sorted(routing["step"].unique().to_list())
    sec = Section("Routing statistics")
    sec.add(
        "Expert-load entropy is the entropy of the share of top-k choices each expert receives (log of the "
        "number of experts when the load is even); importance entropy is that of the mean router softmax."
    )
    sec.add(routing_entropy_over_steps(routing, "load_entropy", "all"))
    sec.add(with_slider(lambda s: routing_at_step(routing, step=s, group="all"), steps))
    return sec
