"""The ``basic`` measurement: per-sample loss, accuracy and confidence, and their group means."""

from __future__ import annotations

import polars as pl
import torch

from workbench.capture import Capture
from workbench.measure import Measurement, StepContext


def group_means(cap: Capture, values: dict[str, torch.Tensor]) -> pl.DataFrame:
    """Per-group means (and ``all``) of per-sample values, NaNs left out, as tidy rows."""
    df = pl.DataFrame({"group": cap.groups} | {k: v.float().numpy() for k, v in values.items()})
    long = df.unpivot(index="group", variable_name="metric", value_name="value").filter(pl.col("value").is_not_nan())
    per_group = long.group_by("group", "metric").agg(pl.col("value").mean())
    overall = long.group_by("metric").agg(pl.col("value").mean()).with_columns(group=pl.lit("all"))
    return pl.concat([per_group, overall.select(per_group.columns)])


class LossAccuracy(Measurement):
    """Per-sample loss, accuracy and confidence, and their group means."""

    name = "basic"

    def __init__(self, per_sample: bool = True):
        self.per_sample = per_sample

    def options(self) -> dict:
        return {"per_sample": self.per_sample}

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        values = {"loss": cap.loss, "accuracy": cap.accuracy, "confidence": cap.confidence}
        parts = [group_means(cap, values)]
        if self.per_sample:
            df = pl.DataFrame({"sample_id": cap.sample_ids, "group": cap.groups} | {k: v.numpy() for k, v in values.items()})
            parts.append(df.unpivot(index=["sample_id", "group"], variable_name="metric", value_name="value"))
        return pl.concat(parts, how="diagonal_relaxed")
