"""CheckpointExplorer: training curves, and routing statistics when measured, on one checkpoint slider."""

from __future__ import annotations

from widgets.base import CheckpointView, require_probe
from widgets.routing import routing_panels
from workbench.probes.basic import LossAccuracy
from workbench.probes.basic.figures import training_curves
from workbench.probes.routing import RoutingStats
from workbench.runs import Run
from workbench.samples import OVERALL
from workbench.store import Store


class CheckpointExplorer(CheckpointView):
    """Accuracy and loss over steps with the chosen checkpoint marked, and, for MoE runs, the routing at
    that checkpoint (expert-load entropy per layer, expert load shares)."""

    def __init__(self, source: Store | Run | str, step: int | None = None, group: str = OVERALL):
        store = require_probe(source, LossAccuracy.name,
                              "workbench measure RUN, or workbench.measure(run, [LossAccuracy(), RoutingStats()])")
        self.store = store
        basic = LossAccuracy.table(store)
        panels = {"training": lambda s: training_curves(basic, step=s)}
        if RoutingStats.measured(store):
            panels |= routing_panels(store, group)
        super().__init__(sorted(basic["step"].unique().to_list()), panels, title=f"{store.run or store.root}",
                         step=step)


__all__ = ["CheckpointExplorer"]
