"""RoutingView: routing statistics per MoE layer on one checkpoint slider."""

from __future__ import annotations

from collections.abc import Callable

import plotly.graph_objects as go

from widgets.base import CheckpointView, require_probe
from workbench.probes.routing import RoutingStats
from workbench.probes.routing.figures import routing_at_step, routing_entropy_over_steps
from workbench.runs import Run
from workbench.samples import OVERALL
from workbench.store import Store


def routing_panels(store: Store, group: str = OVERALL) -> dict[str, Callable[[int], go.Figure]]:
    """The routing at the slider's checkpoint (expert-load entropy per layer, load shares) and the expert-load
    entropy over checkpoints with the checkpoint marked."""
    routing = RoutingStats.table(store)
    return {"routing_at_step": lambda s: routing_at_step(routing, step=s, group=group),
            "load_entropy": lambda s: routing_entropy_over_steps(routing, step=s, group=group)}


class RoutingView(CheckpointView):
    """Expert-load entropy per layer and each expert's load share at the chosen checkpoint, and the expert-load
    entropy over all checkpoints."""

    def __init__(self, source: Store | Run | str, step: int | None = None, group: str = OVERALL):
        store = require_probe(source, RoutingStats.name, "workbench measure RUN --probe routing")
        self.store = store
        steps = sorted(RoutingStats.table(store)["step"].unique().to_list())
        super().__init__(steps, routing_panels(store, group), title=f"routing: {store.run or store.root}", step=step)


__all__ = ["RoutingView", "routing_panels"]
