"""The estimator's torchrun sharding: the rank helpers of :mod:`workbench.distributed`, kept under this name for
the influence modules (each rank reads every ``world``-th batch; sums are all-reduced, factors broadcast from
rank 0, score columns gathered in the documents' order)."""

from workbench.distributed import *  # noqa: F401,F403
from workbench.distributed import __all__  # noqa: F401
