"""PathwayView: routing pathways on one checkpoint slider."""

from __future__ import annotations

import ipywidgets as W
import polars as pl

from workbench.probes.pathways import RoutingPathways
from workbench.probes.pathways import figures as F
from workbench.runs import Run
from workbench.samples import OVERALL
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class PathwayView(CheckpointView):
    """Per group, pathway distance and consistency over steps beside train and test accuracy; a layer x step
    heatmap of per-layer distance for the chosen group; and, at the slider's checkpoint, one sample's pathway
    drawn across layers. When the memorized-at groups were computed, their distance curves too."""

    def __init__(self, source: Store | Run | str, step: int | None = None, group: str | None = None,
                 sample_id: str | None = None, consistency: str = "consistency"):
        store = require_probe(source, RoutingPathways.name,
                              "workbench measure RUN --probe pathways, or workbench.measure(run, [RoutingPathways()])")
        self.store = store
        self.table = RoutingPathways.table(store)
        self.final = RoutingPathways.table(store, final=True)
        groups = [g for g in self.table["group"].unique(maintain_order=True).to_list() if g is not None]
        self.group = group or next((g for g in ("train", "all") if g in groups), groups[0])
        samples = self.table.filter((pl.col("metric") == "n_experts") & pl.col("sample_id").is_not_null())
        ids = sorted(samples["sample_id"].unique().to_list())
        in_group = sorted(samples.filter(pl.col("group") == self.group)["sample_id"].unique().to_list())
        self.sample_id = sample_id or (in_group or ids or [None])[0]
        panels = {
            "curves": lambda s: F.pathway_curves(self.table, step=s, consistency=consistency),
            "layers": lambda s: F.layer_heatmap(self.table, self.group, s),
        }
        if self.sample_id is not None:
            panels["pathway"] = lambda s: F.pathway_figure(self.table, self.sample_id, s)
        kind = self.group if self.group != OVERALL else "train"
        if not self.final.is_empty() and self.final["group"].str.starts_with(f"{kind}@").any():
            panels["since"] = lambda s: F.since_curves(self.final, "distance", kind, step=s)
        steps = sorted(self.table["step"].drop_nulls().unique().to_list())
        super().__init__(steps, panels, title=f"routing pathways: {store.run or store.root}", step=step)

        self.group_picker = W.Dropdown(options=groups, value=self.group, description="group")
        self.sample_picker = W.Dropdown(options=ids, value=self.sample_id, description="sample")
        self.group_picker.observe(self._on_group, names="value")
        self.sample_picker.observe(self._on_sample, names="value")
        children = list(self.children)
        children.insert(children.index(self.slider) + 1, W.HBox([self.group_picker, self.sample_picker]))
        self.children = tuple(children)

    def _on_group(self, change) -> None:
        self.group = change["new"]
        self.rebuild("layers")

    def _on_sample(self, change) -> None:
        self.sample_id = change["new"]
        self.rebuild("pathway")
