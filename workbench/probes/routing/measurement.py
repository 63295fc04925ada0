"""The ``routing`` measurement: expert load and routing entropy per MoE layer and group."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from workbench.capture import Capture, CaptureSpec
from workbench.figures import Section
from workbench.measure import Measurement, StepContext
from workbench.probes.routing import figures
from workbench.runs import Run
from workbench.samples import per_group
from workbench.store import Store


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` of a distribution (0·log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


@dataclass(frozen=True)
class RoutingStats(Measurement):
    """Per MoE layer and group: expert-load entropy (of the top-k choices), importance entropy (of the mean
    routing weights), mean per-sample routing entropy, and each expert's share of the load.

    routing_weights: ``"scores"`` (default: the model's own expert scores as a distribution: softmax
        probabilities, or sigmoid scores normalized to sum 1, as the router scores), ``"topk"`` (the weights it
        applies to its selected experts, normalized per token) or ``"softmax"`` (``"scores"``, for softmax
        routers only); see :class:`~workbench.capture.CaptureSpec`.
    """

    name = "routing"
    view = "widgets.routing:RoutingView"
    in_demo = True
    section_order = 20

    routing_weights: str = "scores"

    def __post_init__(self) -> None:
        CaptureSpec(routing_weights=self.routing_weights)  # validates the choice

    def spec(self) -> CaptureSpec:
        return CaptureSpec(routing=True, routing_weights=self.routing_weights, expert_load=True)

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        rows = []
        for g, idx in per_group(cap.groups):
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

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        return figures.report_section(cls.table(store)) if cls.measured(store) else None


__all__ = ["RoutingStats", "entropy"]
