"""Linear probes on hidden states: batched logistic regression, the ``probes`` measurement and its figures."""

from workbench.probes.linear.functions import *  # noqa: F403
from workbench.probes.linear.functions import __all__ as _functions
from workbench.probes.linear.measurement import LinearProbeAccuracy

__all__ = [*_functions, "LinearProbeAccuracy"]
