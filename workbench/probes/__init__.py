"""Probe families, one folder each: ``workbench/probes/<family>/`` holds the family's pure functions (tensors in,
numbers out), its measurement(s) (a :class:`workbench.Measurement` subclass run over a Run into the store) and
its figures and report section. :func:`workbench.measure.registry` finds the families by folder, so a new one
needs no line anywhere else; its Jupyter view is one module in ``widgets/``.
"""
