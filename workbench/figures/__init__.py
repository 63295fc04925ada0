"""Plotly figure builders: store tables in, figures out.

Each builder is a plain function of polars tables (as :meth:`workbench.Store.table` returns them) and a few
options. Builders that show one checkpoint take ``step``; :func:`with_slider` turns such a builder into one
figure with a frame per checkpoint and plotly's own slider, which is what reports use (they stay interactive
without a kernel). Probe families add their builders in modules of this package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError

GROUP_COLORS = {"train": "#1f77b4", "test": "#d62728", "all": "#7f7f7f"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def color(group: str, i: int = 0) -> str:
    return GROUP_COLORS.get(group, PALETTE[i % len(PALETTE)])


def nearest_step(steps: Sequence[int], step: int | None) -> int:
    steps = sorted(steps)
    if not steps:
        raise InputError("the table has no checkpoints; measure the run first")
    if step is None:
        return steps[-1]
    return min(steps, key=lambda s: (abs(s - step), s))


def _means(basic: pl.DataFrame, metric: str) -> pl.DataFrame:
    return basic.filter((pl.col("metric") == metric) & pl.col("sample_id").is_null()).sort("step")


def training_curves(basic: pl.DataFrame, step: int | None = None, log_x: bool = True) -> go.Figure:
    """Accuracy and loss per group over steps, with a marker line at ``step``."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "loss"), horizontal_spacing=0.12)
    for col, metric in ((1, "accuracy"), (2, "loss")):
        df = _means(basic, metric)
        for i, group in enumerate(g for g in df["group"].unique(maintain_order=True).to_list() if g != "all"):
            d = df.filter(pl.col("group") == group)
            x = [max(s, 1) for s in d["step"].to_list()] if log_x else d["step"].to_list()
            fig.add_trace(
                go.Scatter(
                    x=x, y=d["value"].to_list(), mode="lines+markers", name=group, legendgroup=group,
                    showlegend=col == 1, line=dict(color=color(group, i)), marker=dict(size=4),
                ),
                row=1, col=col,
            )
    if step is not None:
        _step_marker(fig, max(step, 1) if log_x else step, cols=(1, 2))
    fig.update_xaxes(title_text="step", type="log" if log_x else "linear")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_layout(height=340, margin=dict(t=40, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.2))
    return fig


def _step_marker(fig: go.Figure, x: float, cols: Sequence[int] = (1,), row: int = 1) -> None:
    for col in cols:
        fig.add_vline(x=x, line=dict(color="black", dash="dot", width=1), row=row, col=col)


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


def with_slider(build: Callable[[int], go.Figure], steps: Sequence[int], label: str = "step",
                active: int | None = None) -> go.Figure:
    """One figure with a frame per checkpoint and plotly's own slider, from a per-step builder.

    Every frame must have the same traces in the same order (the builders here do). Works offline in an
    HTML file: no kernel, no widget state.
    """
    steps = sorted(steps)
    if not steps:
        raise InputError("no checkpoints to put on a slider; measure the run first")
    figs = [build(s) for s in steps]
    active = len(steps) - 1 if active is None else active
    base = go.Figure(figs[active])
    base.frames = [go.Frame(data=f.data, layout=go.Layout(annotations=f.layout.annotations, shapes=f.layout.shapes,
                                                          title=f.layout.title), name=str(s))
                   for s, f in zip(steps, figs)]
    base.update_layout(
        sliders=[{
            "active": active,
            "currentvalue": {"prefix": f"{label}: "},
            "pad": {"t": 70},
            "steps": [{"label": str(s), "method": "animate",
                       "args": [[str(s)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True},
                                           "transition": {"duration": 0}}]} for s in steps],
        }],
        height=(base.layout.height or 400) + 90,
    )
    return base
