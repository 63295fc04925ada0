"""Figures of the routing-pathway probe: tables of the ``pathways`` store probe in, plotly figures out.

- :func:`pathway_curves`: per group, pathway distance and consistency over steps beside train and test
  accuracy, with the chosen checkpoint marked.
- :func:`layer_heatmap`: per-layer pathway distance, MoE layer x checkpoint.
- :func:`pathway_figure`: one sample's pathway drawn across layers at one checkpoint (and, faint, at the last).
- :func:`since_curves`: distance or consistency of the memorized-at / generalized-at groups over steps.
- :func:`correlation_table`: the correlations ``finalize`` computed, one row per group and metric.
- :func:`report_section`: all of it as a section of the run report.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import (ALL_STEPS, PALETTE, Section, color, nearest_step, pick_groups, step_axis, step_line,
                               step_x, value_at, with_slider)
from workbench.samples import OVERALL


def _means(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col("sample_id").is_null() & pl.col("step").is_not_null())


def pathway_curves(table: pl.DataFrame, step: int | None = None, groups=None, log_x: bool = True,
                   consistency: str = "consistency") -> go.Figure:
    """Three panels over all steps: mean pathway distance, ``consistency`` (or ``consistency_raw``: group mean
    solid, median dashed) and accuracy, one line per group. With ``step``: a dotted line there, the values at
    that step as points and in the title."""
    means = _means(table).filter(pl.col("layer").is_null()).sort("step")
    groups = pick_groups(means, groups, "pathways")
    all_steps = sorted(means["step"].unique().to_list())
    titles = ("pathway distance", f"{consistency.replace('_', ' ')} (mean, median dashed)", "accuracy")
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.08)
    panels = [(1, "distance", "solid"), (2, consistency, "solid"), (2, f"{consistency}_median", "dash"),
              (3, "accuracy", "solid")]
    at = {g: [] for g in groups}
    for col, metric, dash in panels:
        for i, g in enumerate(groups):
            d = means.filter((pl.col("metric") == metric) & (pl.col("group") == g))
            steps, values = d["step"].to_list(), d["value"].to_list()
            fig.add_trace(go.Scatter(x=step_x(steps, log_x, all_steps), y=values, mode="lines+markers",
                                     name=g if dash == "solid" else f"{g} (median)", legendgroup=g,
                                     showlegend=col == 1, marker=dict(size=4),
                                     line=dict(color=color(g, i), dash=dash)), row=1, col=col)
            if step is not None:
                v = value_at(steps, values, step)
                fig.add_trace(go.Scatter(x=step_x([step], log_x, all_steps), y=[v], mode="markers",
                                         showlegend=False, legendgroup=g, hoverinfo="skip",
                                         marker=dict(size=9, color=color(g, i), line=dict(color="black", width=1))),
                              row=1, col=col)
                if v is not None and metric in ("distance", "accuracy"):
                    at[g].append(f"{metric} {v:.2f}")
    for col in (1, 2, 3):
        step_axis(fig, all_steps, log_x, row=1, col=col)
        if step is not None:
            step_line(fig, step, all_steps, log_x, row=1, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=3)
    title = (f"step {step}: " + "; ".join(f"{g} " + ", ".join(v) for g, v in at.items() if v)) \
        if step is not None else f"pathway distance, consistency and accuracy, {ALL_STEPS}"
    fig.update_layout(height=360, margin=dict(t=60, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.2),
                      title=dict(text=title, x=0.01, font=dict(size=13)))
    return fig


def layer_heatmap(table: pl.DataFrame, group: str = "train", step: int | None = None) -> go.Figure:
    """Mean pathway distance of each MoE layer (rows) at each checkpoint (columns) for one group."""
    d = _means(table).filter((pl.col("metric") == "distance") & (pl.col("group") == group)
                             & pl.col("layer").is_not_null())
    if d.is_empty():
        have = _means(table)["group"].unique().to_list()
        raise InputError(f"no per-layer distances for group {group!r}; groups measured: {have}")
    steps = sorted(d["step"].unique().to_list())
    layers = sorted(d["layer"].unique().to_list())
    z = [[math.nan] * len(steps) for _ in layers]
    for s, layer, v in d.select("step", "layer", "value").iter_rows():
        z[layers.index(layer)][steps.index(s)] = v
    # checkpoints are placed evenly (they are log-spaced early on), labelled by their step
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(steps))), y=[f"L{v}" for v in layers], colorscale="Magma",
                               colorbar=dict(title="distance"),
                               hovertemplate="step %{customdata}<br>%{y}<br>distance %{z:.2f}<extra></extra>",
                               customdata=[steps] * len(layers)))
    every = max(1, len(steps) // 10)
    fig.update_xaxes(tickvals=list(range(0, len(steps), every)), ticktext=[str(s) for s in steps[::every]],
                     title_text="step")
    title = f"per-layer pathway distance, {group}, {ALL_STEPS}"
    if step is not None:
        step = nearest_step(steps, step)
        at = steps.index(step)
        fig.add_vline(x=at, line=dict(color="white", dash="dot", width=2))
        title = f"per-layer pathway distance, {group}, step {step}: " + ", ".join(
            f"L{layer} {z[i][at]:.2f}" for i, layer in enumerate(layers) if z[i][at] == z[i][at])
    fig.update_layout(height=320, margin=dict(t=40, b=40, l=50, r=20), title=dict(text=title, x=0.01))
    return fig


def _parse(text: str) -> list[list[int]]:
    return [[int(e) for e in layer.split(",")] for layer in text.split("-")]


def pathway_figure(table: pl.DataFrame, sample_id: str | None = None, step: int | None = None) -> go.Figure:
    """One sample's pathway: at each MoE layer, its experts in weight order (larger marker = earlier in the
    prefix), the top expert joined across layers; the pathway at the last checkpoint is drawn faint."""
    rows = table.filter((pl.col("metric") == "n_experts") & pl.col("sample_id").is_not_null())
    if rows.is_empty() or "pathway" not in rows.columns:
        raise InputError("the pathways table has no per-sample pathways; measure with per_sample=True")
    if sample_id is None:
        sample_id = rows["sample_id"].sort()[0]
    mine = rows.filter(pl.col("sample_id") == sample_id)
    if mine.is_empty():
        raise InputError(f"no sample {sample_id!r} in the pathways table")
    steps = sorted(mine["step"].to_list())
    step = nearest_step(steps, step)
    by_step = dict(mine.select("step", "pathway").iter_rows())
    layer_ids = sorted(table.filter(pl.col("layer").is_not_null())["layer"].unique().to_list())
    # the largest expert id in any pathway, in one polars pass (parsing every pathway string is slow)
    n_exp = 1 + int(rows["pathway"].str.extract_all(r"\d+").explode().cast(pl.Int64).max())
    fig = go.Figure()
    for which, s, style in (("last", steps[-1], dict(color="#bbbbbb")), ("now", step, dict(color="#1f77b4"))):
        path = _parse(by_step[s])
        xs = layer_ids if len(layer_ids) == len(path) else list(range(len(path)))
        px, py, size, text = [], [], [], []
        for x, layer in zip(xs, path):
            for rank, e in enumerate(layer):
                px.append(x), py.append(e), size.append(max(18 - 3 * rank, 6)), text.append(f"#{rank + 1}")
        fig.add_trace(go.Scatter(x=px, y=py, mode="markers", marker=dict(size=size, **style),
                                 name=f"step {s}" + (" (last)" if which == "last" else ""), text=text,
                                 hovertemplate="layer %{x}, expert %{y} (%{text})<extra></extra>"))
        if which == "now":
            fig.add_trace(go.Scatter(x=xs, y=[layer[0] for layer in path], mode="lines", showlegend=False,
                                     line=dict(color="#1f77b4", width=1), hoverinfo="skip"))
    fig.update_xaxes(title_text="MoE layer (block)", tickvals=layer_ids or None, dtick=1)
    fig.update_yaxes(title_text="expert", range=[-0.5, n_exp - 0.5], dtick=1 if n_exp <= 16 else None)
    fig.update_layout(height=340, margin=dict(t=40, b=40, l=50, r=20),
                      title=dict(text=f"pathway of {sample_id} at step {step}: {by_step[step]}", x=0.01))
    return fig


def since_curves(final: pl.DataFrame, metric: str = "distance", kind: str = "train", step: int | None = None,
                 log_x: bool = True, max_groups: int = 6) -> go.Figure:
    """``metric`` over all steps for the groups ``<kind>@<t>`` (memorized or generalized at t), one line each
    for the ``max_groups`` largest groups (a chart of twenty tangled lines shows nothing; the title says how
    many are left out); the step each group settled at is marked on its line."""
    d = final.filter(pl.col("group").str.starts_with(f"{kind}@") & (pl.col("metric") == metric)
                     & pl.col("layer").is_null() & pl.col("step").is_not_null()).sort("step")
    fig = go.Figure()
    n = dict(final.filter(pl.col("metric") == "n_samples").select("group", "value").iter_rows())
    names = d["group"].unique().to_list()
    shown = sorted(sorted(names, key=lambda g: (-n.get(g, 0), g))[:max_groups], key=lambda g: int(g.split("@")[1]))
    all_steps = sorted(d["step"].unique().to_list())
    for i, g in enumerate(shown):
        gd = d.filter(pl.col("group") == g)
        since = int(g.split("@")[1])
        c = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=step_x(gd["step"].to_list(), log_x, all_steps), y=gd["value"].to_list(),
                                 mode="lines", name=f"{g} (n={int(n.get(g, 0))})", legendgroup=g, line=dict(color=c)))
        at = gd.filter(pl.col("step") == since)
        if not at.is_empty():
            fig.add_trace(go.Scatter(x=step_x([since], log_x, all_steps), y=at["value"].to_list(), mode="markers",
                                     showlegend=False, legendgroup=g, hoverinfo="skip",
                                     marker=dict(color=c, size=8, symbol="diamond")))
    if step is not None:
        step_line(fig, step, all_steps, log_x)
    step_axis(fig, all_steps, log_x)
    fig.update_yaxes(title_text=metric.replace("_", " "))
    left_out = len(names) - len(shown)
    more = f"; the {len(shown)} largest of {len(names)} groups" if left_out else ""
    fig.update_layout(height=360, margin=dict(t=40, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.2),
                      title=dict(text=f"{metric.replace('_', ' ')} of groups {kind}@t (◆ = t), {ALL_STEPS}{more}",
                                 x=0.01))
    return fig


def correlation_table(final: pl.DataFrame) -> pl.DataFrame:
    """Correlations with the accuracy group across checkpoints: group, metric, window, pearson, spearman."""
    d = final.filter(pl.col("metric") == "correlation")
    if d.is_empty():
        return pl.DataFrame(schema={"group": pl.String, "of": pl.String, "window": pl.String,
                                    "pearson": pl.Float64, "spearman": pl.Float64})
    return (d.pivot(on="method", index=["group", "of", "window"], values="value")
            .sort("group", "of", "window"))


def _correlation_text(corr: pl.DataFrame, acc_group: str, n_steps: int) -> str:
    def r(group, of, window):
        d = corr.filter((pl.col("group") == group) & (pl.col("of") == of) & (pl.col("window") == window))
        return (float(d["pearson"][0]), float(d["spearman"][0])) if not d.is_empty() else (math.nan, math.nan)

    group = "train" if "train" in corr["group"].to_list() else OVERALL
    parts = []
    for of, label in (("distance", "distance"), ("consistency", "consistency (mean)"),
                      ("consistency_raw_median", "consistency_raw (median)")):
        (p_all, s_all), (p_rise, s_rise) = r(group, of, "all"), r(group, of, "rise")
        parts.append(f"{label}: Pearson {p_all:+.2f}, Spearman {s_all:+.2f} over all checkpoints; "
                     f"{p_rise:+.2f}, {s_rise:+.2f} from the rise on")
    s_raw = r(group, "consistency_raw_median", "all")[1]
    if s_raw != s_raw:
        which = ""
    elif abs(s_raw) < 0.5:
        which = (f" Neither consistency moves steadily with {acc_group} accuracy in this run (Spearman of the "
                 f"median consistency_raw {s_raw:+.2f}).")
    else:
        which = (" In this run consistency_raw rises and consistency = 1 - raw falls" if s_raw > 0 else
                 " In this run consistency = 1 - raw rises and consistency_raw falls") + f" as {acc_group} accuracy rises."
    return (f"Correlation of the {group} group's metrics with {acc_group} accuracy across {n_steps} checkpoints: "
            + "; ".join(parts) + "." + which)


def report_section(table: pl.DataFrame, final: pl.DataFrame, opts: dict) -> Section | None:
    """The pathways section of the run report, from the per-checkpoint and final tables and the options they
    were measured with; None when the table is empty."""
    if table.is_empty():
        return None
    steps = sorted(table["step"].unique().to_list())
    sec = Section("Routing pathways")
    sec.add(
        f"A sample's pathway is, at each MoE layer, the shortest list of experts (by routing weight) whose weight "
        f"exceeds tau = {opts.get('tau', 0.7)}; the distance is the mean Levenshtein distance ({opts.get('unit', 'char')} "
        "unit) between pathways of a group. Consistency compares a sample's routing embeddings at adjacent "
        "layers: consistency = 1 - mean(cos)/max(cos), consistency_raw = mean(cos)/max(cos). Li, Fan & Zhou "
        "(arXiv 2506.21551) found that in OLMoE distance falls and consistency rises as test accuracy rises."
    )
    corr = correlation_table(final)
    if not corr.is_empty():
        sec.add(_correlation_text(corr, opts.get("accuracy_group", "test"), len(steps)))
    sec.add(with_slider(lambda s: pathway_curves(table, step=s), steps))
    groups = [g for g in ("train", "test") if g in table["group"].unique().to_list()] or [OVERALL]
    sec.add(layer_heatmap(table, group=groups[0]))
    if "pathway" in table.columns and table["pathway"].drop_nulls().len():
        sample = table.filter(pl.col("group") == groups[0])["sample_id"].drop_nulls().sort()[0]
        sec.add(with_slider(lambda s: pathway_figure(table, sample, step=s), steps))
    if not final.is_empty() and final["group"].str.contains("@").any():
        for kind in groups:
            if final["group"].str.starts_with(f"{kind}@").any():
                sec.add(since_curves(final, "distance", kind))
    return sec


__all__ = ["correlation_table", "layer_heatmap", "pathway_curves", "pathway_figure", "report_section",
           "since_curves"]
