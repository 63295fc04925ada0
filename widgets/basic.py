"""CheckpointExplorer: training curves and routing statistics on one checkpoint slider."""

from __future__ import annotations

from workbench.probes.basic.figures import training_curves
from workbench.probes.routing.figures import routing_at_step, routing_entropy_over_steps
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class CheckpointExplorer(CheckpointView):
    """Accuracy and loss over steps with the chosen checkpoint marked, and, for MoE runs, the routing at
    that checkpoint (expert-load entropy per layer, expert load shares)."""

    def __init__(self, source: Store | Run | str, step: int | None = None, group: str = "all"):
        store = require_probe(source, "basic", "workbench measure RUN, or workbench.measure(run, [LossAccuracy(), RoutingStats()])")
        self.store = store
        basic = store.table("basic")
        panels = {"training": lambda s: training_curves(basic, step=s)}
        if "routing" in store.probes():
            routing = store.table("routing")
            panels["routing_at_step"] = lambda s: routing_at_step(routing, step=s, group=group)
            panels["load_entropy"] = lambda s: routing_entropy_over_steps(routing, step=s, group=group)
        super().__init__(sorted(basic["step"].unique().to_list()), panels, title=f"{store.run or store.root}",
                         step=step)
