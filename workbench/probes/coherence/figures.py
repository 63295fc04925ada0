"""Figures of the ``coherence`` table: m-coherence over checkpoints per set beside the sets' accuracy, a
block × step heatmap, the tracked matrices at one checkpoint, and the report section."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import ALL_STEPS, Section, color, named_groups, step_axis, step_line, step_marker, step_x, with_slider
from workbench.probes.coherence.findings import m_coherence, overall, summary_text


def sets(table: pl.DataFrame) -> list[tuple[str, str]]:
    """The (group, labels) sets of the table, true labels first, the overall group last."""
    have = table.select("group", "labels").unique().rows()
    groups = named_groups([g for g, _ in have]) + ([] if len({g for g, _ in have}) == 1 else ["all"])
    order = [(g, lab) for lab in ("true", "random") for g in groups]
    return [s for s in order if s in have]


def _style(group: str, labels: str, i: int) -> dict:
    return dict(color=color(group, i), dash="dash" if labels == "random" else "solid")


def coherence_curves(table: pl.DataFrame, step: int | None = None, log_x: bool = True, log_y: bool = True) -> go.Figure:
    """m-coherence of every set over steps, over every tracked matrix and over the blocks' matrices only (the
    output head left out), and the true-label sets' accuracy beside them; dashed lines are the random-label
    controls; a dotted line marks ``step``."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("m-coherence, every tracked matrix", "m-coherence, blocks only",
                                                        "accuracy (true labels)"),
                        column_widths=[0.36, 0.36, 0.28], horizontal_spacing=0.07)
    all_steps = sorted(table["step"].unique().to_list())
    for i, (g, labels) in enumerate(sets(table)):
        name = g if labels == "true" else f"{g}, random labels"
        style = _style(g, labels, i)
        series = [(col, m_coherence(table, g, labels, where), "lines+markers") for col, where in ((1, "all"), (2, "blocks"))]
        if labels == "true" and g != "all":
            series.append((3, overall(table, "accuracy", g, labels), "lines"))
        for col, d, mode in series:
            fig.add_trace(go.Scatter(x=step_x(d["step"].to_list(), log_x, all_steps), y=d["value"].to_numpy(), mode=mode,
                                     name=name, legendgroup=name, showlegend=col == 1, line=style,
                                     marker=dict(size=4)), row=1, col=col)
            if step is not None:
                step_marker(fig, d["step"].to_list(), d["value"].to_list(), step, log_x, all_steps, style["color"],
                            name, row=1, col=col)
    for col in (1, 2):
        fig.add_hline(y=1, line=dict(color="grey", width=1, dash="dot"), row=1, col=col)  # orthogonal gradients
    for col in (1, 2, 3):
        if step is not None:
            step_line(fig, step, all_steps, log_x, row=1, col=col)
        step_axis(fig, all_steps, log_x, row=1, col=col)
    for col in (1, 2):
        fig.update_yaxes(type="log" if log_y else "linear", row=1, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=3)
    fig.update_layout(height=360, margin=dict(t=40, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.22))
    return fig


def layer_heatmap(table: pl.DataFrame, group: str = "train", labels: str = "true", step: int | None = None,
                  metric: str = "m_coherence") -> go.Figure:
    """Block × step heatmap of ``metric`` for one set (log10 of m-coherence)."""
    d = table.filter((pl.col("metric") == metric) & (pl.col("group") == group) & (pl.col("labels") == labels)
                     & pl.col("layer").is_not_null() & pl.col("module").is_null())
    if d.is_empty():
        raise InputError(f"the coherence table has no per-block {metric} of group {group!r} with {labels} labels")
    steps = sorted(d["step"].unique().to_list())
    layers = sorted(d["layer"].unique().to_list())
    w = d.pivot(on="step", index="layer", values="value", sort_columns=True).sort("layer")
    z = [[(math.log10(v) if v and v > 0 else None) if metric == "m_coherence" else v
          for v in row] for row in w.select([str(s) for s in steps]).rows()]
    fig = go.Figure(go.Heatmap(z=z, x=[str(s) for s in steps], y=[f"block {v}" for v in layers],
                               colorscale="Viridis", colorbar=dict(title="log10 m-coh." if metric == "m_coherence"
                                                                    else metric)))
    if step is not None and str(step) in [str(s) for s in steps]:
        fig.add_vline(x=steps.index(step), line=dict(color="white", width=2))
    fig.update_layout(height=80 + 40 * len(layers), margin=dict(t=40, b=40, l=70, r=20),
                      title=dict(text=f"{metric.replace('_', '-')} per block: {group}, {labels} labels, {ALL_STEPS}", x=0.01),
                      xaxis=dict(title="step", type="category"))
    return fig


def unit_bars(table: pl.DataFrame, step: int, group: str = "train") -> go.Figure:
    """m-coherence of every tracked matrix (or stack of experts) at ``step``: true labels against the random
    control of ``group`` (when measured), and the held-out groups with true labels."""
    d = table.filter((pl.col("metric") == "m_coherence") & pl.col("module").is_not_null() & (pl.col("step") == step))
    fig = go.Figure()
    for i, (g, labels) in enumerate(s for s in sets(table) if s[0] != "all"):
        gd = d.filter((pl.col("group") == g) & (pl.col("labels") == labels)).sort("module")
        name = g if labels == "true" else f"{g}, random labels"
        fig.add_trace(go.Bar(x=gd["module"].to_list(), y=gd["value"].to_numpy(), name=name,
                             marker=dict(color=color(g, i), pattern_shape="/" if labels == "random" else "")))
    fig.update_yaxes(type="log", title_text="m-coherence")
    fig.update_layout(height=380, barmode="group", margin=dict(t=40, b=120, l=50, r=20),
                      title=dict(text=f"m-coherence per tracked matrix at step {step}", x=0.01),
                      legend=dict(orientation="h", y=1.12))
    return fig


def report_section(table: pl.DataFrame) -> Section | None:
    if table.is_empty():
        return None
    steps = sorted(table["step"].unique().to_list())
    sec = Section("Gradient coherence")
    sec.add("Coherence of per-example gradients (Chatterjee & Zielinski, arXiv 2203.10036): m-coherence = "
            "|sum of g|^2 / sum of |g|^2 over a set of m examples, 1 when their gradients are orthogonal and m "
            "when they are identical: how many examples of the set a small step along one example's gradient "
            "helps, on average. Dashed: the same training inputs with random labels, the control.")
    text = summary_text(table)
    if text:
        sec.add(text)
    sec.add(with_slider(lambda s: coherence_curves(table, step=s), steps))
    groups = [g for g, _ in sets(table)]
    first = "train" if "train" in groups else groups[0]
    sec.add(layer_heatmap(table, first, "true"))
    if table["module"].drop_nulls().len():
        sec.add(with_slider(lambda s: unit_bars(table, s, first), steps))
    return sec


__all__ = ["coherence_curves", "layer_heatmap", "report_section", "sets", "unit_bars"]
