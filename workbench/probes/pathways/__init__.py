"""Routing pathways (Li, Fan & Zhou, arXiv 2506.21551): the pure functions, the ``pathways`` measurement and
its figures."""

from workbench.probes.pathways.functions import *  # noqa: F403
from workbench.probes.pathways.functions import __all__ as _functions
from workbench.probes.pathways.measurement import RoutingPathways

__all__ = [*_functions, "RoutingPathways"]
