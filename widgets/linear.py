"""ProbeView: linear-probe accuracy per layer and checkpoint beside the model's own accuracy."""

from __future__ import annotations

import ipywidgets as W

from workbench.probes.forgetting import Forgetting
from workbench.probes.forgetting.figures import forgetting_curves
from workbench.probes.linear import LinearProbeAccuracy
from workbench.probes.linear import figures as pf
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class ProbeView(CheckpointView):
    """A layer × checkpoint heatmap of probe accuracy (selectivity and control accuracy on hover) beside the
    model's own accuracy over the same checkpoints, and the probes per layer at the first and the chosen
    checkpoint. Works for training runs and for forgetting runs (which also get their forgetting curves).
    A dropdown picks the task when the run has several."""

    def __init__(self, source: Store | Run | str, task: str | None = None, step: int | None = None,
                 metric: str = "accuracy"):
        store = require_probe(source, LinearProbeAccuracy.name, "workbench measure RUN --probe probes, or "
                              "workbench.measure(run, [LinearProbeAccuracy()])")
        self.store = store
        self.table = LinearProbeAccuracy.table(store)
        names = pf.tasks(self.table)
        self.task = pf.check_task(self.table, task)
        steps = sorted(self.table["step"].unique().to_list())
        first = steps[0]
        panels = {
            "overview": lambda s: pf.probe_overview(self.table, self.task, step=s, metric=metric),
            "layers": lambda s: pf.probe_layers(self.table, self.task, steps=sorted({first, s}),
                                                labels=None),
        }
        static = []
        opts = store.options(Forgetting.name) if Forgetting.measured(store) else None
        if opts and opts.get("task"):  # a forgetting run: its forgetting curves beside the probes
            forgetting = Forgetting.table(store)
            panels["forgetting"] = lambda s: forgetting_curves(forgetting, opts["task"])
            static.append("forgetting")
        super().__init__(steps, panels, static=static, title=f"linear probes: {store.run or store.root}", step=step)
        self.task_picker = W.Dropdown(options=names, value=self.task, description="task")
        self.task_picker.observe(self._on_task, names="value")
        self.children = (self.task_picker, *self.children)

    def _on_task(self, change) -> None:
        self.task = change["new"]
        self._on_step({"new": self.step})


__all__ = ["ProbeView"]
