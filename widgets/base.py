"""The common shape of a view: a checkpoint slider driving figures built from store tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as W
import plotly.graph_objects as go

from workbench.errors import StoreError
from workbench.figures import nearest_step
from workbench.runs import Run
from workbench.store import Store


def as_store(source: Store | Run | str) -> Store:
    """Views take a Store, a Run, or the path of a run folder."""
    if isinstance(source, Store):
        return source
    if isinstance(source, Run):
        return source.store
    return Run.from_folder(source).store


def require_probe(source: Store | Run | str, probe: str, how: str) -> Store:
    """The store behind ``source``, which must hold the ``probe`` table; else an error that says how to
    measure it (``how``)."""
    store = as_store(source)
    if probe not in store.probes():
        raise StoreError(f"the store at {store.root} has no {probe!r} table; measure the run first ({how})")
    return store


class CheckpointView(W.VBox):
    """A slider over checkpoint steps and a set of figure panels, each rebuilt for the chosen step.

    ``panels`` maps a name to ``build(step) -> go.Figure``. Panels that do not depend on the step can ignore
    it; they are rebuilt only when ``static`` names them false. Several views can share one slider
    (``link_to``), which is how a notebook scrubs every probe at once.
    """

    def __init__(self, steps: Sequence[int], panels: dict[str, Callable[[int], go.Figure]],
                 static: Sequence[str] = (), title: str = "", columns: int = 1, step: int | None = None):
        self.steps = sorted(steps)
        self._builders = dict(panels)
        self._static = set(static)
        start = nearest_step(self.steps, step)
        self.slider = W.SelectionSlider(options=self.steps, value=start, description="step",
                                        continuous_update=False, layout=W.Layout(width="95%"))
        self.figures: dict[str, go.FigureWidget] = {
            name: go.FigureWidget(build(start)) for name, build in self._builders.items()
        }
        boxes = list(self.figures.values())
        rows = [W.HBox(boxes[i:i + columns]) for i in range(0, len(boxes), columns)] if columns > 1 else boxes
        header = [W.HTML(f"<b>{title}</b>")] if title else []
        super().__init__(header + [self.slider] + rows)
        self.slider.observe(self._on_step, names="value")

    @property
    def step(self) -> int:
        return self.slider.value

    def set_step(self, step: int) -> None:
        self.slider.value = nearest_step(self.steps, step)

    def link_to(self, other: "CheckpointView") -> None:
        """Drive this view's slider from another's (steps missing here snap to the nearest)."""
        other.slider.observe(lambda ch: self.set_step(ch["new"]), names="value")

    def rebuild(self, name: str, step: int | None = None) -> None:
        """Rebuild panel ``name`` at ``step`` (default: the slider's) in place, e.g. after another control
        changed what it shows."""
        if name not in self.figures:
            return
        new = self._builders[name](self.step if step is None else step)
        fig = self.figures[name]
        with fig.batch_update():
            fig.data = ()
            fig.add_traces(list(new.data))
            fig.layout = new.layout

    def _on_step(self, change) -> None:
        for name in self.figures:
            if name not in self._static:
                self.rebuild(name, change["new"])
