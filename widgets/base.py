"""The common shape of a view: a checkpoint slider driving figures built from store tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio

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


def figure_output(fig: go.Figure) -> dict:
    """A plotly figure as a notebook output (plotly's own mime bundle, drawn by JupyterLab's plotly renderer)."""
    bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig.to_dict())
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else "plotly figure"
    return {"output_type": "display_data", "data": {**bundle, "text/plain": title}, "metadata": {}}


class CheckpointView(W.VBox):
    """A slider over checkpoint steps and a set of figure panels, each rebuilt for the chosen step.

    ``panels`` maps a name to ``build(step) -> go.Figure``. Panels that do not depend on the step can ignore
    it; they are rebuilt only when ``static`` names them false. Several views can share one slider
    (``link_to``), which is how a notebook scrubs every probe at once.

    Each panel is an ``ipywidgets.Output`` whose one output is the figure's plotly JSON, and ``figures[name]``
    is the figure it shows. All the state of the view lives in the kernel's widget models (the slider's index,
    the panels' outputs), so a browser reload redraws the same step everywhere; plotly's ``FigureWidget`` did
    not (it came back with stale panels) and carries its 5 MB JavaScript bundle in every panel's state.
    """

    def __init__(self, steps: Sequence[int], panels: dict[str, Callable[[int], go.Figure]],
                 static: Sequence[str] = (), title: str = "", columns: int = 1, step: int | None = None):
        self.steps = sorted(steps)
        self._builders = dict(panels)
        self._static = set(static)
        start = nearest_step(self.steps, step)
        self.slider = W.SelectionSlider(options=self.steps, value=start, description="step",
                                        continuous_update=False, layout=W.Layout(width="95%"))
        self.figures: dict[str, go.Figure] = {}
        self.panels: dict[str, W.Output] = {name: W.Output() for name in self._builders}
        for name in self._builders:
            self.rebuild(name, start)
        boxes = list(self.panels.values())
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
        """Rebuild panel ``name`` at ``step`` (default: the slider's), e.g. after another control changed what
        it shows."""
        if name not in self.panels:
            return
        fig = self._builders[name](self.step if step is None else step)
        self.figures[name] = fig
        self.panels[name].outputs = (figure_output(fig),)

    def _on_step(self, change) -> None:
        for name in self.panels:
            if name not in self._static:
                self.rebuild(name, change["new"])
