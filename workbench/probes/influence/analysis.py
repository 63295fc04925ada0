"""Reading a [queries, documents] score matrix: top documents, cross-query correlation, per-nat scores,
the share of positive influence held by the top documents, and the power-law slope of the sorted scores
(the summaries of Grosse et al., arXiv 2308.03296, and Ruis et al., arXiv 2411.12580; docs/probes.md,
"Influence")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from workbench.errors import InputError


def _matrix(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise InputError(f"{what} must be a [queries, documents] matrix with documents; got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise InputError(f"{what} hold NaN or infinity; recompute them (see the estimator's numerical errors)")
    return scores


def top_documents(scores: torch.Tensor, k: int, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest (or, with ``largest=False``, lowest) scoring documents of each query:
    (values [Q, k], document indices [Q, k]), best first."""
    scores = _matrix(scores)
    if not 1 <= k <= scores.shape[1]:
        raise InputError(f"k must be between 1 and the number of documents ({scores.shape[1]}), not {k}")
    return torch.topk(scores, k, dim=1, largest=largest, sorted=True)


def cross_query_correlation(scores: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between queries' score vectors over all documents: [Q, Q]."""
    scores = _matrix(scores)
    if scores.shape[1] < 2:
        raise InputError("a correlation needs at least two documents")
    flat = scores.std(dim=1) == 0
    if bool(flat.any()):
        raise InputError(f"queries {flat.nonzero().flatten().tolist()} score every document the same; their "
                         "correlation is undefined")
    return torch.corrcoef(scores.to(torch.float64)).to(scores.dtype)


def per_nat(scores: torch.Tensor, query_nll: torch.Tensor) -> torch.Tensor:
    """Scores divided by each query's −log p(completion | prompt) (nats): comparable across queries."""
    scores = _matrix(scores)
    nll = torch.as_tensor(query_nll, dtype=scores.dtype).flatten()
    if nll.numel() != scores.shape[0]:
        raise InputError(f"query_nll has {nll.numel()} values for {scores.shape[0]} queries; give one per query")
    if not bool((nll > 0).all()):
        raise InputError("query_nll must be positive (−log p of the completion, in nats) for every query")
    return scores / nll.unsqueeze(1)


def top_share(scores: torch.Tensor, percentiles: Sequence[float] = (0.1, 1.0, 10.0)) -> torch.Tensor:
    """Share of each query's total positive influence held by its top ``p`` percent of positively
    influential documents, for each ``p`` in ``percentiles`` (in percent): [Q, len(percentiles)].

    The top ``p`` percent of ``n`` positive documents is the ``ceil(p / 100 · n)`` highest. A query with no
    positive score gets NaN.
    """
    scores = _matrix(scores)
    ps = [float(p) for p in percentiles]
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise InputError(f"percentiles must be in (0, 100], got {list(percentiles)}")
    out = torch.full((scores.shape[0], len(ps)), float("nan"), dtype=torch.float64)
    for q, row in enumerate(scores.to(torch.float64)):
        pos = torch.sort(row[row > 0], descending=True).values
        if pos.numel() == 0:
            continue
        total, cum = pos.sum(), pos.cumsum(0)
        for j, p in enumerate(ps):
            out[q, j] = cum[math.ceil(p / 100 * pos.numel()) - 1] / total
    return out


def powerlaw_slope(scores: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """Slope of a least-squares line through (log rank, log score) of each query's positive scores sorted
    in descending order (``top`` highest only, if given): [Q]. About −0.3 in the studies' LLMs.
    A query with fewer than two positive scores gets NaN."""
    scores = _matrix(scores)
    out = torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    for q, row in enumerate(scores.to(torch.float64)):
        pos = torch.sort(row[row > 0], descending=True).values
        if top is not None:
            pos = pos[:top]
        if pos.numel() < 2:
            continue
        x = torch.log(torch.arange(1, pos.numel() + 1, dtype=torch.float64))
        y = torch.log(pos)
        xc = x - x.mean()
        out[q] = (xc * (y - y.mean())).sum() / (xc * xc).sum()
    return out
