"""Forgetting by fine-tuning on random labels (Zhang, Choshen & Andreas, arXiv 2409.02228)."""

from workbench.probes.forgetting.protocol import *  # noqa: F403
from workbench.probes.forgetting.protocol import __all__

__all__ = list(__all__)
