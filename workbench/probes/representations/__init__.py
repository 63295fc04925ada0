"""Representations over checkpoints: neighbourhood purity, silhouette, Fourier structure along cyclic labels and
2-D layouts aligned across checkpoints (AlignedUMAP or Procrustes-aligned PCA): the pure functions, the
``representations`` measurement and its figures."""

from workbench.probes.representations.functions import *  # noqa: F403
from workbench.probes.representations.functions import __all__ as _functions
from workbench.probes.representations.measurement import Representations

__all__ = [*_functions, "Representations"]
