"""Influence of training documents on a model's answers: EK-FAC, KFAC, diagonal and identity estimators.

    factors = fit_factors(model, documents, loss_fn=task.loss)            # strategy="ekfac", fisher="true"
    scores = pairwise_scores(model, factors, queries, documents,
                             loss_fn=task.loss, measurement_fn=task.measurement)   # [queries, documents]

``documents`` and ``queries`` are any iterables of batches; ``loss_fn(model, batch)`` and
``measurement_fn(model, batch)`` return the batch's loss summed over examples and tokens. A positive score
means up-weighting the document lowers the query's measurement (raises the completion's probability).
docs/probes.md ("Influence") defines the estimator; the modules here follow it one concept each:
``tracking`` (what is tracked, one backward pass per batch), ``fit`` and ``factors`` (covariances,
eigenbases, corrected eigenvalues, save/load), ``precondition``, ``scores``, ``analysis``, ``tracin``,
``distributed`` (torchrun sharding) and ``tasks`` (how losses are called, sampled labels); ``lm`` and ``moe``
for language models and their experts. The :class:`Influence` measurement (``measurement``) runs it at every
checkpoint of a run into the store, ``findings`` reads the studies' per-query-type findings from those
tables, and ``figures`` draws them.
"""

from workbench.probes.influence.analysis import (
    cross_query_correlation,
    per_nat,
    powerlaw_slope,
    top_documents,
    top_share,
)
from workbench.probes.influence.factors import STRATEGIES, Factors
from workbench.probes.influence.fit import fit_factors
from workbench.probes.influence.measurement import Influence, influence_tables, measure_influence
from workbench.probes.influence.precondition import Preconditioner
from workbench.probes.influence.scores import pairwise_scores, self_scores
from workbench.gradients.tasks import CrossEntropyTask, sample_labels
from workbench.probes.influence.tracin import tracin_scores
from workbench.gradients.tracking import (
    Block,
    Recorder,
    Rows,
    TrackedLinear,
    TrackedModule,
    TrackingReport,
    register_tracker,
    resolve_modules,
    tracking_report,
)

__all__ = [
    "STRATEGIES",
    "Block",
    "CrossEntropyTask",
    "Factors",
    "Influence",
    "Preconditioner",
    "Recorder",
    "Rows",
    "TrackedLinear",
    "TrackedModule",
    "TrackingReport",
    "cross_query_correlation",
    "fit_factors",
    "influence_tables",
    "measure_influence",
    "pairwise_scores",
    "per_nat",
    "powerlaw_slope",
    "register_tracker",
    "resolve_modules",
    "sample_labels",
    "self_scores",
    "top_documents",
    "top_share",
    "tracin_scores",
    "tracking_report",
]
