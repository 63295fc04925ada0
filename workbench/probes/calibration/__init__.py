"""Calibration and discrimination (Steyvers et al., arXiv 2510.05126): the pure metrics, confidence sources,
the ``calibration`` measurement and its figures."""

from workbench.probes.calibration.functions import *  # noqa: F403
from workbench.probes.calibration.functions import __all__ as _functions
from workbench.probes.calibration.measurement import Calibration

__all__ = [*_functions, "Calibration"]
