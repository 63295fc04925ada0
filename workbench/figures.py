"""What every family's figures share: colors, the nearest stored step, a slider over checkpoints, a report section.

Figure builders are plain functions of polars tables (as :meth:`workbench.Store.table` returns them) and a
few options; each probe family keeps its own in ``workbench/probes/<family>/figures.py``. Builders that show
one checkpoint take ``step``; :func:`with_slider` turns such a builder into one figure with a frame per
checkpoint and plotly's own slider, which is what reports use (they stay interactive without a kernel). A
:class:`Section` is a family's part of the run report (:meth:`workbench.Measurement.section`).

Conventions every builder follows, so that a figure never misleads about the checkpoint axis:

- A figure that follows the slider shows the chosen step in its title, and what changes with the step is data
  (bars, heatmap cells, the values at the step as points), so a frame differs from the next in its data.
- A figure that spans all checkpoints says so in its title (:data:`ALL_STEPS`).
- Steps on a log axis: step 0 cannot sit on a log scale, so it is drawn half a step-ratio left of the smallest
  positive step and its tick is labelled "0" (:func:`step_x`, :func:`step_axis`), never silently at x = 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import polars as pl

from workbench.errors import InputError
from workbench.samples import OVERALL

GROUP_COLORS = {"train": "#1f77b4", "test": "#d62728", OVERALL: "#7f7f7f"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
#: Appended to the title of a figure that does not follow the slider.
ALL_STEPS = "all checkpoints"


def color(group: str, i: int = 0) -> str:
    return GROUP_COLORS.get(group, PALETTE[i % len(PALETTE)])


def rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def nearest_step(steps: Sequence[int], step: int | None) -> int:
    steps = sorted(steps)
    if not steps:
        raise InputError("the table has no checkpoints; measure the run first")
    if step is None:
        return steps[-1]
    return min(steps, key=lambda s: (abs(s - step), s))


def zero_at(steps: Sequence[int]) -> float:
    """Where step 0 is drawn on a log axis: half the smallest positive step (0.5 when that is step 1)."""
    positive = [s for s in steps if s > 0]
    return (min(positive) if positive else 1) / 2


def step_x(steps: Sequence[int], log_x: bool, all_steps: Sequence[int] | None = None) -> list[float]:
    """x positions of ``steps``: the steps themselves, except step 0 on a log axis (see :func:`zero_at`;
    ``all_steps`` are the axis's steps, when ``steps`` is only some of them)."""
    if not log_x:
        return list(steps)
    z = zero_at(all_steps if all_steps is not None else steps)
    return [s if s > 0 else z for s in steps]


def step_axis(fig: go.Figure, steps: Sequence[int], log_x: bool, title: str | None = "step", **where) -> None:
    """Set an x axis of steps (``where``: row/col of a subplot): linear, or log with step 0's tick labelled."""
    if not log_x:
        fig.update_xaxes(type="linear", title_text=title, **where)
        return
    steps = list(steps)
    top = max(max(steps, default=1), 1)
    ticks = [10 ** k for k in range(0, int(math.floor(math.log10(top))) + 1)]
    vals, text = ticks, [f"{t:,}" for t in ticks]
    if 0 in steps:
        z = zero_at(steps)
        vals, text = [z] + [t for t in ticks if t > z], ["0"] + [f"{t:,}" for t in ticks if t > z]
    fig.update_xaxes(type="log", tickvals=vals, ticktext=text, title_text=title, **where)


def step_line(fig: go.Figure, step: int, steps: Sequence[int], log_x: bool, **where) -> None:
    """The dotted vertical line at the chosen checkpoint (``where``: row/col, or nothing for the whole figure)."""
    fig.add_vline(x=step_x([step], log_x, steps)[0], line=dict(color="black", dash="dot", width=1), **where)


def step_marker(fig: go.Figure, steps: Sequence[int], values: Sequence, step: int, log_x: bool,
                all_steps: Sequence[int], line_color: str, legendgroup: str | None = None, **where) -> None:
    """A series' point at the chosen checkpoint, as a trace of its own (the same traces at every step, so that a
    slider moves the data and not only the dotted line; an empty point where the series has no value)."""
    fig.add_trace(go.Scatter(x=step_x([step], log_x, all_steps), y=[value_at(steps, values, step)], mode="markers",
                             legendgroup=legendgroup, showlegend=False, hoverinfo="skip",
                             marker=dict(size=9, color=line_color, line=dict(color="black", width=1))), **where)


def value_at(steps: Sequence[int], values: Sequence, step: int):
    """The value at ``step`` of a series (None where the series has no value there, or a NaN)."""
    for s, v in zip(steps, values):
        if s == step:
            return None if v is None or v != v else v
    return None


def _axis_ranges(fig: go.Figure) -> dict:
    """The axes with a fixed range, for a frame to carry: plotly's animate keeps the axis ranges it drew first
    and does not autorange again, so a builder whose scale changes from step to step fixes its range per step
    (as :func:`~workbench.probes.influence.figures.top_documents_figure` does)."""
    return {name: {"range": axis["range"]} for name, axis in fig.layout.to_plotly_json().items()
            if re.fullmatch(r"[xy]axis\d*", name) and axis.get("range") is not None}


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
    n = {len(f.data) for f in figs}
    if len(n) != 1:
        raise InputError(f"the figure's builder gives {sorted(n)} traces at different steps; a slider needs the "
                         "same traces at every step")
    active = len(steps) - 1 if active is None else active
    base = go.Figure(figs[active])
    base.frames = [go.Frame(data=f.data, layout=go.Layout(annotations=f.layout.annotations, shapes=f.layout.shapes,
                                                          title=f.layout.title, **_axis_ranges(f)), name=str(s))
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


@dataclass
class Section:
    """A titled part of a report: text paragraphs and figures, in order."""

    title: str
    items: list = field(default_factory=list)  # str (a paragraph of plain text) or go.Figure

    def add(self, item) -> "Section":
        self.items.append(item)
        return self


def named_groups(groups: Sequence[str]) -> list[str]:
    """The sample groups of a table's ``group`` values, without the overall group (unless it is the only one)."""
    named = [g for g in groups if g is not None and g != OVERALL]
    return named or [g for g in groups if g is not None]


def pick_groups(table: pl.DataFrame, groups: Sequence[str] | None, what: str) -> list[str]:
    """``groups`` after checking that the ``what`` table holds each; by default its sample groups
    (:func:`named_groups`)."""
    have = [g for g in table["group"].unique(maintain_order=True).to_list() if g is not None]
    if groups is None:
        return named_groups(have)
    missing = [g for g in groups if g not in have]
    if missing:
        raise InputError(f"the {what} table has no group(s) {missing}; it has {have}")
    return list(groups)
