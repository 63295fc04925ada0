"""CoherenceView: gradient coherence of every sample set on the checkpoint slider."""

from __future__ import annotations

import ipywidgets as W

from workbench.probes.coherence import GradientCoherence
from workbench.probes.coherence import figures as F
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class CoherenceView(CheckpointView):
    """m-coherence over steps of each set (the random-label controls dashed) beside the sets' accuracy; a block
    × step heatmap of the chosen set; and, at the slider's checkpoint, the m-coherence of every tracked matrix.
    Link it to other views with :meth:`link_to` to scrub everything at once."""

    def __init__(self, source: Store | Run | str, step: int | None = None, group: str | None = None):
        store = require_probe(source, GradientCoherence.name,
                              "workbench measure RUN --probe coherence, or workbench.measure(run, [GradientCoherence()])")
        self.store = store
        self.table = GradientCoherence.table(store)
        sets = F.sets(self.table)
        self.set = next((s for s in sets if s[0] == group), None) or next(
            (s for s in sets if s == ("train", "true")), sets[0])
        panels = {
            "curves": lambda s: F.coherence_curves(self.table, step=s),
            "layers": lambda s: F.layer_heatmap(self.table, *self.set, step=s),
            "units": lambda s: F.unit_bars(self.table, s, self.set[0]),
        }
        steps = sorted(self.table["step"].unique().to_list())
        super().__init__(steps, panels, title=f"gradient coherence: {store.run or store.root}", step=step)
        labels = {f"{g}, {lab} labels": (g, lab) for g, lab in sets}
        self.set_picker = W.Dropdown(options=list(labels), value=f"{self.set[0]}, {self.set[1]} labels",
                                     description="set")
        self.set_picker.observe(lambda ch: self._on_set(labels[ch["new"]]), names="value")
        children = list(self.children)
        children.insert(children.index(self.slider) + 1, self.set_picker)
        self.children = tuple(children)

    def _on_set(self, chosen: tuple[str, str]) -> None:
        self.set = chosen
        self.rebuild("layers")
        self.rebuild("units")
