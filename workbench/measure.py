"""Running measurements over a Run into its store: one capture pass per checkpoint, resumable.

A :class:`Measurement` says what it needs from the capture (:class:`CaptureSpec`), turns one checkpoint's
capture into a tidy table, and may compute something across all checkpoints at the end (``finalize``).
:func:`measure` loads each checkpoint that some measurement has not finished, captures once with the union
of their specs, writes each measurement's part atomically, and releases the model. Killed and started
again, it resumes at the first checkpoint without a part and ends with the same tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm

from workbench.capture import Capture, CaptureSpec, capture
from workbench.errors import InputError
from workbench.runs import Checkpoint, Run
from workbench.samples import SampleSet
from workbench.store import Store


@dataclass
class StepContext:
    run: Run
    checkpoint: Checkpoint
    samples: SampleSet

    @property
    def step(self) -> int:
        return self.checkpoint.step


class Measurement:
    """Base class of the drivers that turn captures into store tables."""

    name: str = "measurement"

    def prepare(self, run: Run) -> None:
        """Called by :func:`measure` before options and specs are read: a measurement whose spec depends on
        the run (such as its number of blocks) settles it here."""

    def spec(self) -> CaptureSpec:
        return CaptureSpec()

    def options(self) -> dict:
        """Everything that changes the numbers; a resume under other options is refused."""
        return {}

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        raise NotImplementedError

    def finalize(self, store: Store, run: Run) -> pl.DataFrame | None:
        """A table computed across all checkpoints, or None."""
        return None


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


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` of a distribution (0·log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


class RoutingStats(Measurement):
    """Per MoE layer and group: expert-load entropy (of the top-k choices), importance entropy (of the mean
    routing weights), mean per-sample routing entropy, and each expert's share of the load.

    routing_weights: ``"scores"`` (default: the model's own expert scores as a distribution: softmax
    probabilities, or sigmoid scores normalized to sum 1, as the router scores), ``"topk"`` (the weights it
    applies to its selected experts, normalized per token) or ``"softmax"`` (``"scores"``, for softmax routers
    only); see :class:`~workbench.capture.CaptureSpec`.
    """

    name = "routing"

    def __init__(self, routing_weights: str = "scores"):
        CaptureSpec(routing_weights=routing_weights)  # validates the choice
        self.routing_weights = routing_weights

    def spec(self) -> CaptureSpec:
        return CaptureSpec(routing=True, routing_weights=self.routing_weights, expert_load=True)

    def options(self) -> dict:
        return {"routing_weights": self.routing_weights}

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        rows = []
        groups = list(dict.fromkeys(cap.groups)) + ["all"]
        for g in groups:
            idx = cap.group_indices(g) if g != "all" else torch.arange(len(cap))
            w = cap.routing[idx]  # [n, L, E]
            load = cap.expert_load[idx].mean(0)  # [L, E], sums to k per layer
            load_share = load / load.sum(-1, keepdim=True)
            importance = w.mean(0)
            per_layer = {
                "load_entropy": entropy(load_share),
                "importance_entropy": entropy(importance / importance.sum(-1, keepdim=True)),
                "sample_entropy": entropy(w).mean(0),
            }
            for metric, v in per_layer.items():
                for slot, layer in enumerate(cap.moe_layers):
                    rows.append({"metric": metric, "group": g, "layer": layer, "value": float(v[slot])})
            for slot, layer in enumerate(cap.moe_layers):
                for e in range(load_share.shape[1]):
                    rows.append(
                        {"metric": "expert_load", "group": g, "layer": layer, "expert": e, "value": float(load_share[slot, e])}
                    )
        return pl.DataFrame(rows, schema_overrides={"expert": pl.Int32})


def measure(
    run: Run,
    measurements: Sequence[Measurement],
    *,
    samples: SampleSet | None = None,
    steps: Sequence[int] | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **capture_kwargs,
) -> Store:
    """Measure every checkpoint of ``run`` (or ``steps``) into ``run.store``; returns the store."""
    if not measurements:
        raise InputError("give at least one measurement (e.g. LossAccuracy(), RoutingStats())")
    names = [m.name for m in measurements]
    if len(set(names)) != len(names):
        raise InputError(f"measurement names must differ, got {names}")
    samples = samples if samples is not None else run.samples
    store = run.store
    for m in measurements:
        m.prepare(run)
        store.begin(m.name, m.options(), overwrite=overwrite)
    spec = CaptureSpec()
    for m in measurements:
        spec = spec.union(m.spec())
    wanted = [c for c in run.checkpoints if steps is None or c.step in steps]
    todo = [c for c in wanted if any(not store.has(m.name, c.step) for m in measurements)]
    bar = tqdm(todo, desc=f"measuring {run.name}", unit="ckpt", disable=not progress)
    for ckpt in bar:
        bar.set_postfix(step=ckpt.step)
        model = ckpt.load(dtype=dtype)
        try:
            cap = capture(model, samples, spec, device=device, **capture_kwargs)
        finally:
            del model
        ctx = StepContext(run=run, checkpoint=ckpt, samples=samples)
        for m in measurements:
            if not store.has(m.name, ckpt.step):
                store.write(m.name, ckpt.step, m.measure(cap, ctx))
        del cap
    for m in measurements:
        final = m.finalize(store, run)
        if final is not None:
            store.write_final(m.name, final)
    return store
