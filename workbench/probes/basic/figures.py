"""Figures of the ``basic`` table: accuracy and loss per group over checkpoints, and the report's training
section (:meth:`LossAccuracy.section <workbench.probes.basic.LossAccuracy.section>`)."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.figures import (ALL_STEPS, Section, color, named_groups, step_axis, step_line, step_x, value_at,
                               with_slider)


def _means(basic: pl.DataFrame, metric: str) -> pl.DataFrame:
    return basic.filter((pl.col("metric") == metric) & pl.col("sample_id").is_null()).sort("step")


def training_curves(basic: pl.DataFrame, step: int | None = None, log_x: bool = True) -> go.Figure:
    """Accuracy and loss per group over steps. With ``step``: a dotted line there, each curve's value at that
    step as a larger point, and the values in the title (so a slider frame changes data, not just a line)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "loss"), horizontal_spacing=0.12)
    all_steps = sorted(basic["step"].unique().to_list())
    at_step = []
    for col, metric in ((1, "accuracy"), (2, "loss")):
        df = _means(basic, metric)
        for i, group in enumerate(named_groups(df["group"].unique(maintain_order=True).to_list())):
            d = df.filter(pl.col("group") == group)
            steps, values = d["step"].to_list(), d["value"].to_list()
            fig.add_trace(
                go.Scatter(
                    x=step_x(steps, log_x, all_steps), y=values, mode="lines+markers", name=group,
                    legendgroup=group, showlegend=col == 1, line=dict(color=color(group, i)), marker=dict(size=4),
                ),
                row=1, col=col,
            )
            if step is not None:
                v = value_at(steps, values, step)
                fig.add_trace(go.Scatter(x=step_x([step], log_x, all_steps), y=[v], mode="markers",
                                         legendgroup=group, showlegend=False, hoverinfo="skip",
                                         marker=dict(size=10, color=color(group, i), line=dict(color="black", width=1))),
                              row=1, col=col)
                if v is not None:
                    at_step.append(f"{group} {metric} {v:.3f}" if metric == "accuracy" else f"{group} loss {v:.2f}")
    if step is not None:
        for col in (1, 2):
            step_line(fig, step, all_steps, log_x, row=1, col=col)
    for col in (1, 2):
        step_axis(fig, all_steps, log_x, row=1, col=col)
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    title = f"step {step}: " + ", ".join(at_step) if step is not None else f"accuracy and loss, {ALL_STEPS}"
    fig.update_layout(height=360, margin=dict(t=60, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.2),
                      title=dict(text=title, x=0.01, font=dict(size=13)))
    return fig


def report_section(basic: pl.DataFrame, history: list[dict] | None = None) -> Section:
    """Accuracy at the last checkpoint, when the run memorized and generalized (from its training ``history``,
    if it recorded one), and the training curves with a checkpoint slider."""
    steps = sorted(basic["step"].unique().to_list())
    sec = Section("Training and test accuracy")
    acc = basic.filter((basic["metric"] == "accuracy") & basic["sample_id"].is_null())
    last = acc.filter(acc["step"] == steps[-1])
    groups = named_groups(last["group"].to_list())
    summary = ", ".join(f"{g} {v:.3f}" for g, v in last.select("group", "value").iter_rows() if g in groups)
    sec.add(f"{len(steps)} checkpoints from step {steps[0]} to {steps[-1]}. Accuracy at the last checkpoint: {summary}.")
    if history:
        sec.add(_transition_text(history))
    sec.add(with_slider(lambda s: training_curves(basic, step=s), steps))
    return sec


def _transition_text(history: list[dict]) -> str:
    mem = next((h["step"] for h in history if h.get("train_acc", 0) >= 0.99), None)
    gen = next((h["step"] for h in history if h.get("test_acc", 0) >= 0.95), None)
    parts = []
    if mem is not None:
        test_then = next(h["test_acc"] for h in history if h["step"] == mem)
        parts.append(f"train accuracy first reached 0.99 at step {mem}, when test accuracy was {test_then:.2f}")
    if gen is not None:
        parts.append(f"test accuracy first reached 0.95 at step {gen}")
    elif history:
        parts.append(f"test accuracy had not reached 0.95 by the last checkpoint (step {history[-1]['step']}: "
                     f"{history[-1].get('test_acc', float('nan')):.2f})")
    if not parts:
        return ""
    text = "; ".join(parts) + "."
    return ("Memorization then generalization: " + text) if mem is not None and gen is not None else \
        text[0].upper() + text[1:]
__all__ = ["report_section", "training_curves"]
