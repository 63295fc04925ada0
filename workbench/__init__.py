"""The generalization workbench: see when a model stops memorizing and starts to generalize.

Headless core: runs of checkpoints, batched capture, probes, the Parquet store, figures and reports.
Importable without Jupyter; the Jupyter views live in the separate ``widgets`` package.
"""

from workbench.capture import Capture, CaptureSpec, capture
from workbench.errors import WorkbenchError
from workbench.measure import Measurement, measure
from workbench.probes.basic import LossAccuracy
from workbench.probes.routing import RoutingStats
from workbench.runs import Checkpoint, Run
from workbench.samples import SampleSet
from workbench.store import Store

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "CaptureSpec",
    "Checkpoint",
    "LossAccuracy",
    "Measurement",
    "RoutingStats",
    "Run",
    "SampleSet",
    "Store",
    "WorkbenchError",
    "capture",
    "measure",
]
