"""Jupyter views over a workbench store: every probe on one checkpoint slider.

Views read tables from a :class:`workbench.Store`, build figures with :mod:`workbench.figures`, and lay
them out with ipywidgets. This package imports ``workbench``; ``workbench`` never imports it.
"""

from widgets.base import CheckpointView
from widgets.calibration import ReliabilityView
from widgets.basic import CheckpointExplorer
from widgets.influence import InfluenceBrowser
from widgets.pathways import PathwayView
from widgets.linear import ProbeView

__all__ = ["CheckpointExplorer", "CheckpointView", "InfluenceBrowser", "PathwayView", "ProbeView", "ReliabilityView"]
