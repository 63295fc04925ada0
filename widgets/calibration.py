"""ReliabilityView: the reliability diagram at the slider's checkpoint beside ECE and AUROC over steps."""

from __future__ import annotations

from collections.abc import Sequence

from workbench.probes.calibration import Calibration
from workbench.probes.calibration import figures as figs
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class ReliabilityView(CheckpointView):
    """Left: the reliability diagram (accuracy per confidence bin against the diagonal) at the chosen
    checkpoint. Right: ``metrics`` (default ECE and AUROC) over all checkpoints per group, with the chosen
    checkpoint marked. Link it to other views with :meth:`link_to` to scrub everything at once."""

    def __init__(self, source: Store | Run | str, step: int | None = None, groups: Sequence[str] | None = None,
                 metrics: Sequence[str] = ("ece", "auroc"), panel_width: int = 520):
        store = require_probe(source, Calibration.name,
                              "workbench measure RUN --probe calibration, or workbench.measure(run, [Calibration()])")
        self.store = store
        self.table = Calibration.table(store)
        panels = {
            "reliability": lambda s: figs.reliability_diagram(self.table, step=s, groups=groups, width=panel_width),
            "over_steps": lambda s: figs.calibration_over_steps(self.table, metrics, groups=groups, step=s,
                                                                 width=panel_width),
        }
        super().__init__(sorted(self.table["step"].unique().to_list()), panels,
                         title=f"calibration: {store.run or store.root}", columns=2, step=step)
