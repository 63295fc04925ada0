"""Calibration and discrimination over checkpoints: the ``calibration`` measurement.

Per checkpoint and per group (and ``all``) it writes, from the capture's per-sample confidence (mean
probability of the argmax token over the scored positions) and accuracy:

- one row per metric: ``n``, ``accuracy``, ``confidence`` (mean), ``overconfidence`` (mean confidence −
  accuracy), ``ece`` and ``mce`` (with the chosen binning), ``ece_uniform`` and ``ece_quantile`` (both
  binnings, for comparison), ``brier``, ``nll``, ``auroc``, ``auprc``, and with bootstrapping
  ``ece_low``/``ece_high`` and ``auroc_low``/``auroc_high``;
- reliability-diagram rows ``reliability_count``, ``reliability_confidence``, ``reliability_accuracy``,
  ``reliability_lower``, ``reliability_upper`` with the extra key column ``bin`` (null means for empty bins).

A sample counts as right when its accuracy reaches ``correct_threshold`` (default 1: every scored token is
the argmax; for the built-in task there is one scored token per sample, so this is the plain bit). Where a
metric is undefined (AUROC of a group the model gets all right) the row holds NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import polars as pl
import torch

from workbench.capture import Capture
from workbench.checks import is_integer
from workbench.errors import InputError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext
from workbench.probes.calibration import figures
from workbench.probes.calibration import functions as cal
from workbench.runs import Run
from workbench.samples import per_group
from workbench.store import Store

SCALARS = ("n", "accuracy", "confidence", "overconfidence", "ece", "mce", "ece_uniform", "ece_quantile", "brier",
           "nll", "auroc", "auprc")
RELIABILITY = ("count", "confidence", "accuracy", "lower", "upper")


@dataclass(frozen=True)
class Calibration(Measurement):
    """Calibration (ECE, MCE, Brier, NLL, reliability diagram) and discrimination (AUROC, AUPRC) of the
    model's confidence per checkpoint and group."""

    name = "calibration"
    view = "widgets.calibration:ReliabilityView"
    in_demo = True
    section_order = 50

    n_bins: int = 10
    binning: str = "uniform"
    bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0
    correct_threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.binning not in cal.BINNINGS:
            raise InputError(f"binning must be one of {cal.BINNINGS}, not {self.binning!r}")
        if not is_integer(self.n_bins) or self.n_bins < 1:
            raise InputError(f"n_bins must be a positive integer, not {self.n_bins!r}")
        if self.bootstrap < 0:
            raise InputError("bootstrap is the number of resamples (0 to skip intervals); it cannot be negative")
        if not 0 < self.correct_threshold <= 1:
            raise InputError(f"correct_threshold must lie in (0, 1], not {self.correct_threshold}")

    def measure(self, cap: Capture, ctx: StepContext | None = None) -> pl.DataFrame:
        # Mean probabilities can pass 1 by a rounding error in float32; a sample with nothing scored is NaN.
        conf = cap.confidence.double().clamp(0, 1)
        valid = ~torch.isnan(conf) & ~torch.isnan(cap.accuracy)
        correct = (cap.accuracy.double() >= self.correct_threshold - 1e-9).double()
        parts = []
        for g, idx in per_group(cap.groups):
            idx = idx[valid[idx]]
            if len(idx) == 0:
                continue
            parts.append(self.group_rows(conf[idx], correct[idx], g))
        if not parts:
            raise InputError("no sample has a scored position; calibration needs answers to score")
        return pl.concat(parts, how="diagonal_relaxed")

    def group_rows(self, conf: torch.Tensor, correct: torch.Tensor, group: str) -> pl.DataFrame:
        """The rows of one group at one checkpoint."""
        with warnings.catch_warnings():
            # Undefined metrics (AUROC of a group answered all right) are stored as NaN; no warning per step.
            warnings.simplefilter("ignore", cal.UndefinedMetricWarning)
            m, kind = self.n_bins, self.binning
            values = {
                "n": float(len(conf)),
                "accuracy": float(correct.mean()),
                "confidence": float(conf.mean()),
                "overconfidence": float(conf.mean() - correct.mean()),
                "ece": float(cal.ece(conf, correct, m, kind)),
                "mce": float(cal.mce(conf, correct, m, kind)),
                "ece_uniform": float(cal.ece(conf, correct, m, "uniform")),
                "ece_quantile": float(cal.ece(conf, correct, m, "quantile")),
                "brier": float(cal.brier(conf, correct)),
                "nll": float(cal.nll(conf, correct)),
                "auroc": float(cal.auroc(conf, correct)),
                "auprc": float(cal.auprc(conf, correct)),
            }
            if self.bootstrap:
                for name, kw in (("ece", dict(n_bins=m, binning=kind)), ("auroc", {})):
                    ci = cal.bootstrap_ci(name, conf, correct, n=self.bootstrap, level=self.level, seed=self.seed, **kw)
                    values[f"{name}_low"], values[f"{name}_high"] = float(ci.low), float(ci.high)
        rel = cal.reliability(conf, correct, m, kind)
        scalars = pl.DataFrame({"metric": list(values), "value": list(values.values())},
                               schema={"metric": pl.String, "value": pl.Float64})
        bins = rel.unpivot(index="bin", on=list(RELIABILITY), variable_name="metric", value_name="value").with_columns(
            ("reliability_" + pl.col("metric")).alias("metric"), pl.col("value").cast(pl.Float64))
        return pl.concat([scalars, bins.select("metric", "value", "bin")], how="diagonal_relaxed").with_columns(
            group=pl.lit(group))

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        table = cls.table(store)
        if table.is_empty():
            return None
        summary = None
        if "test" in table["group"].unique().to_list():
            try:
                summary = transition_summary(table, group="test")
            except InputError:
                summary = None
        return figures.report_section(table, summary)


def scalar_table(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (step, group) and one column per scalar metric, from the store's calibration table."""
    rows = table.filter(pl.col("bin").is_null() if "bin" in table.columns else pl.lit(True))
    wide = rows.pivot(on="metric", index=["step", "group"], values="value", aggregate_function="first")
    return wide.sort("step", "group")


def transition_summary(table: pl.DataFrame, group: str = "test", train: str = "train",
                       memorized: float = 0.99, generalized: float = 0.95) -> pl.DataFrame:
    """Calibration and discrimination of ``group`` at the landmarks of a grokking run, in step order: the
    first checkpoint, the first where ``train`` accuracy reaches ``memorized``, the one with the largest
    ``group`` ECE, the first where ``group`` accuracy reaches ``generalized``, and the last. Landmarks that
    never happen are left out."""
    wide = scalar_table(table)
    g = wide.filter(pl.col("group") == group).sort("step")
    if g.is_empty():
        raise InputError(f"the calibration table has no group {group!r}; it has {wide['group'].unique().to_list()}")
    tr = wide.filter(pl.col("group") == train).select("step", pl.col("accuracy").alias("train_accuracy"))
    g = g.join(tr, on="step", how="left")
    marks = [("first checkpoint", g["step"][0])]
    mem = g.filter(pl.col("train_accuracy") >= memorized)
    if not mem.is_empty():
        marks.append((f"{train} accuracy >= {memorized}", mem["step"][0]))
    marks.append((f"largest {group} ECE", g.sort("ece", descending=True, nulls_last=True)["step"][0]))
    gen = g.filter(pl.col("accuracy") >= generalized)
    if not gen.is_empty():
        marks.append((f"{group} accuracy >= {generalized}", gen["step"][0]))
    marks.append(("last checkpoint", g["step"][-1]))
    cols = [c for c in ("train_accuracy", "accuracy", "confidence", "ece", "ece_low", "ece_high", "mce", "brier", "nll",
                        "auroc", "auroc_low", "auroc_high", "auprc") if c in g.columns]
    landmarks = pl.DataFrame({"landmark": [m[0] for m in marks], "step": [m[1] for m in marks]},
                             schema={"landmark": pl.String, "step": g.schema["step"]}).sort("step", maintain_order=True)
    return landmarks.join(g.select(["step"] + cols), on="step", how="left", maintain_order="left").rename(
        {c: f"{group}_{c}" for c in cols if c != "train_accuracy"})


__all__ = ["Calibration", "scalar_table", "transition_summary"]
