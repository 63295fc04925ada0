"""Plotly figure builders: store tables in, figures out.

Each builder is a plain function of polars tables (as :meth:`workbench.Store.table` returns them) and a few
options. Builders that show one checkpoint take ``step``; :func:`with_slider` turns such a builder into one
figure with a frame per checkpoint and plotly's own slider, which is what reports use (they stay interactive
without a kernel). Each probe family keeps its own builders in ``workbench/probes/<family>/figures.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import plotly.graph_objects as go

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
