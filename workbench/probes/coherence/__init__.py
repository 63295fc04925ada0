"""Gradient coherence (Chatterjee & Zielinski, arXiv 2203.10036): the pure functions, the ``coherence``
measurement and its figures."""

from workbench.probes.coherence.functions import *  # noqa: F403
from workbench.probes.coherence.functions import __all__ as _functions
from workbench.probes.coherence.measurement import GradientCoherence

__all__ = [*_functions, "GradientCoherence"]
