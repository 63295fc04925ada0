"""Loss, accuracy and confidence per sample and group: the ``basic`` measurement and its figures."""

from workbench.probes.basic.measurement import LossAccuracy, group_means

__all__ = ["LossAccuracy", "group_means"]
