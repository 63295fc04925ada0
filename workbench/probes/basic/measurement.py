"""The ``basic`` measurement: per-sample loss, accuracy and confidence, and their group means."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from workbench.capture import Capture
from workbench.figures import Section
from workbench.measure import Measurement, StepContext
from workbench.probes.basic import figures
from workbench.runs import Run
from workbench.samples import OVERALL
from workbench.store import Store


def group_means(cap: Capture, values: dict[str, torch.Tensor]) -> pl.DataFrame:
    """Per-group means (and the overall group's) of per-sample values, NaNs left out, as tidy rows."""
    df = pl.DataFrame({"group": cap.groups} | {k: v.float().numpy() for k, v in values.items()})
    long = df.unpivot(index="group", variable_name="metric", value_name="value").filter(pl.col("value").is_not_nan())
    per_group = long.group_by("group", "metric").agg(pl.col("value").mean())
    overall = long.group_by("metric").agg(pl.col("value").mean()).with_columns(group=pl.lit(OVERALL))
    return pl.concat([per_group, overall.select(per_group.columns)])


@dataclass(frozen=True)
class LossAccuracy(Measurement):
    """Per-sample loss, accuracy and confidence over each sample's scored tokens, and their group means.

    per_sample: keep the per-sample rows (``sample_id`` set) beside the group means.
    """

    name = "basic"
    view = "widgets.basic:CheckpointExplorer"
    in_demo = True
    section_order = 10

    per_sample: bool = True

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        values = {"loss": cap.loss, "accuracy": cap.accuracy, "confidence": cap.confidence}
        parts = [group_means(cap, values)]
        if self.per_sample:
            df = pl.DataFrame({"sample_id": cap.sample_ids, "group": cap.groups} | {k: v.numpy() for k, v in values.items()})
            parts.append(df.unpivot(index=["sample_id", "group"], variable_name="metric", value_name="value"))
        return pl.concat(parts, how="diagonal_relaxed")

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        history = run.info.get("history") if run is not None else None
        return figures.report_section(cls.table(store), history)


__all__ = ["LossAccuracy", "group_means"]
