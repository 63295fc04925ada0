"""Routing statistics of mixture-of-experts layers: the ``routing`` measurement and its figures."""

from workbench.probes.routing.measurement import RoutingStats, entropy

__all__ = ["RoutingStats", "entropy"]
