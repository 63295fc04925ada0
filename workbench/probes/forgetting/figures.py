"""Figures of forgetting: the ``forgetting`` table of a forgetting run, and the tables across runs.

- :func:`forgetting_curves`: two-option accuracy of the forget set, the held-out data and other tasks over
  the forgetting steps.
- :func:`forget_matrix_figure`: the task × task forget-ratio matrix.
- :func:`predictor_scatter`: a predictor against the forget ratio across tasks.
- :func:`report_section`: the report's section of a forgetting run.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import polars as pl

from workbench.errors import InputError
from workbench.figures import Section


def forgetting_curves(table: pl.DataFrame, task: str, log_x: bool = False) -> go.Figure:
    """Two-option accuracy over the forgetting steps: the forget set, the task's held-out inputs (train without
    the forget set, test), the other tasks' test splits (thin), and how well the random labels are fitted."""
    acc = table.filter(pl.col("metric").is_in(["option_accuracy", "fit_random_labels"])).sort("step")
    if acc.is_empty():
        raise InputError("the forgetting table is empty; make the run with workbench.probes.forgetting.forget()")
    fig = go.Figure()
    styles = {f"{task}:forget": ("forget set", "#d62728", 3), f"{task}:test": ("held-out (test)", "#1f77b4", 3),
              f"{task}:train": ("held-out (train split)", "#17becf", 2)}
    others = [g for g in acc["group"].unique(maintain_order=True).to_list()
              if g.endswith(":test") and g not in styles]
    for g, (label, c, w) in styles.items():
        d = acc.filter((pl.col("group") == g) & (pl.col("metric") == "option_accuracy"))
        if d.height:
            fig.add_trace(go.Scatter(x=d["step"].to_list(), y=d["value"].to_list(), mode="lines+markers", name=label,
                                     line=dict(color=c, width=w)))
    fit = acc.filter(pl.col("metric") == "fit_random_labels")
    if fit.height:
        fig.add_trace(go.Scatter(x=fit["step"].to_list(), y=fit["value"].to_list(), mode="lines",
                                 name="fit to the trained labels", line=dict(color="#ff7f0e", dash="dash")))
    for i, g in enumerate(others):
        d = acc.filter((pl.col("group") == g) & (pl.col("metric") == "option_accuracy"))
        fig.add_trace(go.Scatter(x=d["step"].to_list(), y=d["value"].to_list(), mode="lines", name=g,
                                 line=dict(color="#999999", width=1), opacity=0.7))
    fig.add_hline(y=0.5, line=dict(color="black", dash="dot", width=1), annotation_text="chance")
    fig.update_xaxes(title_text="forgetting step", type="log" if log_x else "linear")
    fig.update_yaxes(title_text="two-option accuracy", range=[0, 1.02])
    fig.update_layout(height=340, margin=dict(t=40, b=40, l=60, r=20), title=f"forgetting {task}")
    return fig


def forget_matrix_figure(names: Sequence[str], matrix, title: str = "forget ratio (test split)") -> go.Figure:
    """Heatmap of the task × task matrix: row = task forgotten, column = task measured."""
    z = [[None if v != v else float(v) for v in row] for row in matrix.tolist()]
    text = [["" if v is None else f"{v:.2f}" for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=list(names), y=list(names), text=text, texttemplate="%{text}",
                               colorscale="RdBu_r", zmid=0, zmin=-1, zmax=1.2,
                               hovertemplate="forgot %{y}<br>measured %{x}<br>ratio %{z:.3f}<extra></extra>"))
    fig.update_xaxes(title_text="task measured")
    fig.update_yaxes(title_text="task forgotten", autorange="reversed")
    fig.update_layout(height=380, margin=dict(t=40, b=40, l=90, r=20), title=title)
    return fig


def predictor_scatter(predictors: pl.DataFrame, predictor: str = "confidence",
                      target: str = "forget_ratio_test") -> go.Figure:
    """One point per task: a predictor (initial confidence or representation variability) against the forget
    ratio on held-out data."""
    fig = go.Figure(go.Scatter(x=predictors[predictor].to_list(), y=predictors[target].to_list(),
                               mode="markers+text", text=predictors["task"].to_list(), textposition="top center",
                               marker=dict(size=10, color="#1f77b4")))
    fig.update_xaxes(title_text=predictor.replace("_", " "))
    fig.update_yaxes(title_text=target.replace("_", " "))
    fig.update_layout(height=320, margin=dict(t=40, b=40, l=60, r=20), title=f"{predictor} vs {target}")
    return fig


def report_section(table: pl.DataFrame, protocol: dict) -> Section:
    """Accuracy on the forget set and on held-out inputs before and after forgetting, and the curves."""
    sec = Section("Forgetting")
    task = protocol.get("task")
    if task:
        acc = table.filter(pl.col("metric") == "option_accuracy")
        first, last = acc["step"].min(), acc["step"].max()
        val = lambda g, s: acc.filter((pl.col("group") == g) & (pl.col("step") == s))["value"]  # noqa: E731
        f0, f1 = val(f"{task}:forget", first), val(f"{task}:forget", last)
        h0, h1 = val(f"{task}:test", first), val(f"{task}:test", last)
        if len(f0) and len(h0):
            sec.add(f"Forgetting {task} with {protocol.get('labels')} labels on {protocol.get('n')} inputs (lr "
                    f"{protocol.get('lr')}, {protocol.get('epochs')} epochs): two-option accuracy on the forget set "
                    f"{f0[0]:.3f} → {f1[0]:.3f}, on held-out test inputs {h0[0]:.3f} → {h1[0]:.3f}.")
        sec.add(forgetting_curves(table, task))
    return sec


__all__ = ["forget_matrix_figure", "forgetting_curves", "predictor_scatter", "report_section"]
