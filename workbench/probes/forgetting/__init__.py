"""Forgetting by fine-tuning on random labels (docs/probes.md, "Forgetting"; Zhang, Choshen & Andreas, arXiv
2409.02228): the pure measures, choice tasks, the protocol that makes a forgetting run, the ``forgetting``
measurement over its checkpoints, tables across forgetting runs, and figures."""

from workbench.probes.forgetting.functions import (
    forget_gap,
    forget_matrix,
    forget_ratio,
    relative_confidence,
    representation_variability,
)
from workbench.probes.forgetting.measurement import Forgetting, choice_metrics, option_probs
from workbench.probes.forgetting.protocol import LABEL_MODES, forget, open_forgetting_run
from workbench.probes.forgetting.tables import forgetting_results, matrix, predictor_correlations, predictor_table
from workbench.probes.forgetting.tasks import ChoiceTask, combine, load_choices, save_choices, scored_position
from workbench.samples import split_group
from workbench.stats import correlation

__all__ = [
    "LABEL_MODES", "ChoiceTask", "Forgetting", "choice_metrics", "combine", "correlation", "forget", "forget_gap",
    "forget_matrix", "forget_ratio", "forgetting_results", "load_choices", "matrix", "open_forgetting_run",
    "option_probs", "predictor_correlations", "predictor_table", "relative_confidence",
    "representation_variability", "save_choices", "scored_position", "split_group",
]
