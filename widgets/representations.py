"""RepresentationView: the aligned 2-D layout of the hidden states on the checkpoint slider, coloured by a chosen
column, beside neighbourhood purity over checkpoints."""

from __future__ import annotations

import ipywidgets as W
import polars as pl

from workbench.probes.representations import Representations
from workbench.probes.representations import figures as F
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


def settled_groups(store: Store) -> pl.DataFrame | None:
    """Each sample's memorized-at / generalized-at group (``train@t``, ``test@t``; ``never`` when it settled only
    at the end or not at all) from the pathways measurement's table, when the store holds one."""
    if "pathways" not in store.probes():
        return None
    final = store.table("pathways", final=True)
    d = final.filter(pl.col("metric").is_in(["memorized_since", "generalized_since"]) & pl.col("sample_id").is_not_null())
    if d.is_empty():
        return None
    since = pl.when(pl.col("value").is_nan()).then(pl.lit("never")).otherwise(
        pl.col("group") + "@" + pl.col("value").cast(pl.Int64, strict=False).cast(pl.String))
    return d.select("sample_id", settled=since)


class RepresentationView(CheckpointView):
    """Left: the aligned layout of one block's states at the embedded checkpoint nearest the slider, one marker
    shape per group, coloured by ``color``: ``label`` (the answer), ``group``, ``correct``, ``purity`` or, when
    the store holds the pathways measurement, ``settled`` (each sample's memorized-at or generalized-at group);
    hover shows the sample. Below: purity (and, with cyclic labels, Fourier structure) over checkpoints beside
    accuracy. Link it to other views with :meth:`link_to` to scrub everything at once."""

    def __init__(self, source: Store | Run | str, step: int | None = None, color: str = "label",
                 layer: int | None = None):
        store = require_probe(source, Representations.name, "workbench measure RUN --probe representations, or "
                                                             "workbench.measure(run, [Representations()])")
        self.store = store
        self.table = Representations.table(store)
        self.final = Representations.table(store, final=True)
        self.period = (store.options(Representations.name) or {}).get("period") or None
        self.extra = settled_groups(store)
        has_layout = not self.final.is_empty() and (self.final["metric"] == "embedding").any()
        layers = sorted(self.final.filter(pl.col("metric") == "embedding")["layer"].unique().to_list()) \
            if has_layout else []
        self.layer = layer if layer is not None else (layers[0] if layers else F.default_layer(self.table))
        self.color = color
        panels = {"curves": lambda s: F.purity_curves(self.table, self.layer, step=s)}
        if has_layout:
            panels = {"layout": lambda s: F.embedding_scatter(
                self.final, s, self.layer, self.color, extra=self.extra if self.color == "settled" else None,
                period=self.period)} | panels
        steps = sorted(self.table["step"].unique().to_list())
        super().__init__(steps, panels, title=f"representations: {store.run or store.root}", step=step)
        colors = list(F.COLORS) + (["settled"] if self.extra is not None else [])
        self.color_picker = W.Dropdown(options=colors, value=color if color in colors else "label",
                                       description="colour")
        self.layer_picker = W.Dropdown(options=layers or [self.layer], value=self.layer, description="block")
        self.color_picker.observe(self._on_color, names="value")
        self.layer_picker.observe(self._on_layer, names="value")
        children = list(self.children)
        children.insert(children.index(self.slider) + 1, W.HBox([self.color_picker, self.layer_picker]))
        self.children = tuple(children)

    def _on_color(self, change) -> None:
        self.color = change["new"]
        self.rebuild("layout")

    def _on_layer(self, change) -> None:
        self.layer = change["new"]
        self.rebuild("layout")
        self.rebuild("curves")
