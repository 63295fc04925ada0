"""Figures of the ``basic`` table: accuracy and loss per group over checkpoints, and the report's training
section."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.figures import color, with_slider
from workbench.report import Section
from workbench.store import Store


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


def training_section(store: Store, run=None) -> Section | None:
    if "basic" not in store.probes():
        return None
    basic = store.table("basic")
    steps = sorted(basic["step"].unique().to_list())
    sec = Section("Training and test accuracy")
    acc = basic.filter((basic["metric"] == "accuracy") & basic["sample_id"].is_null())
    last = acc.filter(acc["step"] == steps[-1])
    summary = ", ".join(f"{g} {v:.3f}" for g, v in last.select("group", "value").iter_rows() if g != "all")
    sec.add(f"{len(steps)} checkpoints from step {steps[0]} to {steps[-1]}. Accuracy at the last checkpoint: {summary}.")
    if run is not None and run.info.get("history"):
        sec.add(_transition_text(run.info["history"]))
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
    return ("Memorization then generalization: " + "; ".join(parts) + ".") if parts else ""
