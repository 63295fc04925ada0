"""Model adapters: where each architecture keeps its blocks, routers and MLPs."""

from workbench.models.adapters import ADAPTERS, Adapter, adapter_for, register_adapter, router_weight

__all__ = ["ADAPTERS", "Adapter", "adapter_for", "register_adapter", "router_weight"]
