"""Jupyter views over a workbench store: every probe on one checkpoint slider.

Views read tables from a :class:`workbench.Store`, build figures with each probe family's figure builders, and
lay them out with ipywidgets. There is one module per family (``widgets/<family>.py``); a measurement names its
view (``Measurement.view = "widgets.<module>:<Class>"``), and :func:`view` opens it by the measurement's name.
This package imports ``workbench``; ``workbench`` never imports it.
"""

from __future__ import annotations

import importlib

from widgets.base import CheckpointView, as_store
from workbench.measure import measurement_class, registry


def _load(dotted: str) -> type:
    module, _, cls = dotted.partition(":")
    return getattr(importlib.import_module(module), cls)


def views() -> dict[str, type]:
    """Every registered measurement's view class, by measurement name."""
    return {name: _load(cls.view) for name, cls in registry().items() if cls.view}


def view(source, name: str, **kwargs) -> CheckpointView:
    """The view of measurement ``name`` over ``source`` (a Store, a Run, or a run folder)."""
    cls = measurement_class(name)
    if not cls.view:
        raise AttributeError(f"measurement {name!r} has no Jupyter view")
    return _load(cls.view)(source, **kwargs)


def __getattr__(attr: str):
    # `from widgets import PathwayView`: the view classes are found through the registry, so a new family's view
    # needs no line here.
    for dotted in {cls.view for cls in registry().values() if cls.view}:
        if dotted.rpartition(":")[2] == attr:
            return _load(dotted)
    raise AttributeError(f"module 'widgets' has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {cls.view.rpartition(":")[2] for cls in registry().values() if cls.view})


__all__ = ["CheckpointView", "as_store", "view", "views"]
