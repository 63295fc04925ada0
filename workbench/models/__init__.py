"""Model adapters: where each architecture keeps its blocks, routers, experts and MLPs, and how it routes."""

from workbench.models.adapters import (
    ADAPTERS,
    REGISTERED,
    Adapter,
    MoELayer,
    adapter_for,
    register_adapter,
)
from workbench.models.experts import ExpertLayout, ExpertMatrix, expert_layout, register_expert_layout
from workbench.models.routing import Routing

__all__ = ["ADAPTERS", "REGISTERED", "Adapter", "ExpertLayout", "ExpertMatrix", "MoELayer", "Routing", "adapter_for",
           "expert_layout", "register_adapter", "register_expert_layout"]
