"""The generalization workbench: see when a model stops memorizing and starts to generalize.

Headless core: runs of checkpoints, batched capture, probe families, the Parquet store, figures and reports.
Importable without Jupyter; the Jupyter views live in the separate ``widgets`` package.

The path of data, and the modules that hold each part: checkpoints (:mod:`workbench.runs`, with the model
adapters in :mod:`workbench.models`) → one capture pass per checkpoint (:mod:`workbench.capture`) → probe
families (``workbench/probes/<family>/``, run by :func:`measure`) → the store (:mod:`workbench.store`) →
figures and reports (each family's ``figures.py``, :mod:`workbench.report`) and the views (``widgets``).
"""

from workbench.capture import Capture, CaptureSpec, capture
from workbench.errors import WorkbenchError
from workbench.measure import Measurement, StepContext, measure, registry, setting
from workbench.probes.basic import LossAccuracy
from workbench.probes.routing import RoutingStats
from workbench.runs import Checkpoint, Run
from workbench.samples import SampleSet, read_samples
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
    "StepContext",
    "Store",
    "WorkbenchError",
    "capture",
    "measure",
    "read_samples",
    "registry",
    "setting",
]
