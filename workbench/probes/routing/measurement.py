"""The ``routing`` measurement: expert load and routing entropy per MoE layer and group."""

from __future__ import annotations

import polars as pl
import torch

from workbench.capture import Capture, CaptureSpec
from workbench.measure import Measurement, StepContext


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` of a distribution (0·log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


class RoutingStats(Measurement):
    """Per MoE layer and group: expert-load entropy (of the top-k choices), importance entropy (of the mean
    softmax), mean per-sample routing entropy, and each expert's share of the load."""

    name = "routing"

    def __init__(self, routing_weights: str = "softmax"):
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
