"""Influence scores: queries against documents (pairwise), documents against themselves (self).

``score(q, d) = Σ_blocks ⟨P⁻¹ ∇m(q), ∇L(d)⟩`` with ``m`` the query's measurement and ``L`` the document's loss:
positive means that up-weighting the document lowers the measurement (raises the completion's probability
when ``m = −log p``), kronfluence's sign. Query gradients are preconditioned once and kept, optionally as a
rank-R factorization; each document batch then takes one forward and one backward pass.

Per-token contributions split a document's score over its tokens: token ``t`` contributes
``Σ_blocks s_tᵀ P⁻¹∇m(q) a_t``; they sum to the score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from workbench.checks import is_integer
from workbench.errors import InputError, NumericalError
from workbench.probes.influence import distributed, idle
from workbench.probes.influence.factors import Factors
from workbench.probes.influence.passes import compute_dtype, evaluating, model_device, run_pass
from workbench.probes.influence.precondition import Preconditioner
from workbench.gradients.tracking import Rows, StackedRows, TrackedModule, resolve_modules, units

#: Elements of one chunk of intermediate [queries, examples, tokens, ...] tensors (bounds memory).
CHUNK_ELEMENTS = 2**25


def tracked_for(model: nn.Module, factors: Factors, modules: Sequence[str | TrackedModule] | None):
    """The model's tracked modules for these factors, checked against the shapes they were fitted with."""
    tracked = resolve_modules(model, factors.modules if modules is None else modules)
    if factors.idle:  # experts the fit left out (zero gradient on every document): left out here too
        tracked, _ = idle.leave_out(tracked, set(factors.idle))
    shapes = {b.key: (b.out_dim, b.in_dim) for t in tracked for b in t.blocks()}
    if shapes != {k: tuple(v) for k, v in factors.shapes.items()}:
        missing = sorted(set(factors.shapes) - set(shapes))
        extra = sorted(set(shapes) - set(factors.shapes))
        changed = sorted(k for k in set(shapes) & set(factors.shapes) if tuple(factors.shapes[k]) != shapes[k])
        raise InputError(
            "the factors do not fit this model's tracked layers"
            + (f"; fitted but not tracked now: {missing[:5]}" if missing else "")
            + (f"; tracked now but not fitted: {extra[:5]}" if extra else "")
            + (f"; different shapes: {changed[:5]}" if changed else "")
            + ". Fit the factors on this model (fit_factors) with the same modules"
        )
    return tracked


class QueryGradients:
    """Preconditioned query gradients per block (or stack): full [G, Q, out, in] or a rank-R pair
    ([G, Q, out, R], [G, Q, R, in]), with G the stack's members (1 for a single block)."""

    def __init__(self) -> None:
        self.full: dict[str, torch.Tensor] = {}
        self.low: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.n = 0

    def scores(self, key: str, r: Rows | StackedRows) -> torch.Tensor:
        """[Q, B] scores of block (or stack) ``key`` against the documents in ``r``, summed over members."""
        if key in self.low:
            return self.token_scores(key, r).sum(-1)
        q = self.full[key].flatten(2)  # [G, Q, out·in]
        step = max(1, CHUNK_ELEMENTS // q[0, 0].numel() // q.shape[0])
        parts = []
        for i in range(0, r.n_examples, step):
            part = r.select(slice(i, i + step))
            if not r.stacked:
                parts.append(q[0] @ part.per_example_gradient().flatten(1).T)
                continue
            # A stack's per-example gradients in ranked order [B, G, ...]: scored as they are, each member's
            # scores then added to their examples' columns (no reordering of the gradients themselves).
            g = part.products(part.s, part.a).flatten(2)
            by_rank = torch.bmm(q, g.permute(1, 2, 0))  # [G, Q, B]
            member = torch.arange(q.shape[0], device=q.device).unsqueeze(1)
            cols = q.new_zeros(q.shape[1], q.shape[0] * part.n_examples)
            cols.index_copy_(1, (member * part.n_examples + part.ranked).flatten(), by_rank.transpose(0, 1).flatten(1))
            parts.append(cols.view(q.shape[1], q.shape[0], part.n_examples).sum(1))
        return torch.cat(parts, dim=1)

    def token_scores(self, key: str, r: Rows | StackedRows) -> torch.Tensor:
        """[Q, B, T] per-row contributions of block ``key`` (a stack's: [Q, B, G·width], in the layout of
        :meth:`StackedRows.token_positions`)."""
        if r.stacked:
            return self._stacked_token_scores(key, r)
        b, t = r.a.shape[:2]
        out = r.a.new_zeros(self.n, b, t)
        # Widest intermediate per (query, example, row): two [.., R] factors, or one [.., out or in] product.
        width = 2 * self.low[key][0].shape[-1] if key in self.low else max(self.full[key].shape[2:])
        step = max(1, CHUNK_ELEMENTS // max(1, self.n * t * width))
        for i in range(0, b, step):
            a, s = r.a[i:i + step], r.s[i:i + step]
            if key in self.low:
                left, right = (x[0] for x in self.low[key])
                u = torch.einsum("bto,qor->qbtr", s, left)
                v = torch.einsum("bti,qri->qbtr", a, right)
                out[:, i:i + step] = (u * v).sum(-1)
            else:
                out[:, i:i + step] = torch.einsum("bto,qoi,bti->qbt", s, self.full[key][0], a)
        return out

    def _stacked_token_scores(self, key: str, r: StackedRows) -> torch.Tensor:
        g, n_rows = r.a.shape[:2]
        out = r.a.new_zeros(self.n, g, n_rows)  # per packed row, then laid out per example
        width = 2 * self.low[key][0].shape[-1] if key in self.low else max(self.full[key].shape[2:])
        step = max(1, CHUNK_ELEMENTS // max(1, self.n * g * width))
        for i in range(0, n_rows, step):
            a, s = r.a[:, i:i + step], r.s[:, i:i + step]
            if key in self.low:
                left, right = self.low[key]
                u = torch.einsum("gro,gqok->qgrk", s, left)
                v = torch.einsum("gri,gqki->qgrk", a, right)
                out[:, :, i:i + step] = (u * v).sum(-1)
            else:
                out[:, :, i:i + step] = torch.einsum("gro,gqoi,gri->qgr", s, self.full[key], a)
        return r.by_example(out.permute(1, 2, 0)).permute(2, 0, 1)  # [Q, B, G·width]


def _low_rank(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, sv, vh = torch.linalg.svd(g, full_matrices=False)
    return u[..., :rank] * sv[..., None, :rank], vh[..., :rank, :]


def query_gradients(model, tracked, pre: Preconditioner, queries, measurement_fn, *, query_rank,
                    common) -> QueryGradients:
    """Every rank computes all queries' preconditioned gradients (queries are few; documents are many)."""
    if query_rank is not None and (not is_integer(query_rank) or query_rank < 1):
        raise InputError(f"query_rank must be a positive integer or None, not {query_rank!r}")
    parts: dict[str, list] = {}
    n = 0
    for _, rows, b in run_pass(model, queries, tracked, measurement_fn, what="measurement_fn", sample=False,
                               sharded=False, desc="influence: queries", **common):
        with torch.no_grad():
            for key, r in rows.items():
                g = pre.rows(key, r)
                parts.setdefault(key, []).append((n, b, g if r.stacked else g.unsqueeze(0)))
        n += b
    if n == 0:
        raise InputError("queries gave no batches; pass a non-empty iterable of query batches")
    qg = QueryGradients()
    qg.n = n
    for key, bs in units(tracked).items():
        block = bs[0]
        full = torch.zeros(len(bs), n, block.out_dim, block.in_dim, dtype=common["dtype"], device=model_device(model))
        for start, b, g in parts.get(key, []):
            full[:, start:start + b] += g
        if query_rank is not None and query_rank < min(block.out_dim, block.in_dim):
            qg.low[key] = _low_rank(full, query_rank)
        else:
            qg.full[key] = full
    return qg


def _preconditioner(factors: Factors, damping, tracked, dtype, device) -> Preconditioner:
    stacks = {k: [b.key for b in bs] for k, bs in units(tracked).items() if bs[0].stack is not None}
    return Preconditioner(factors, damping, dtype=dtype, device=device, stacks=stacks)


def _options(model, dtype, mask_fn, autocast_dtype, progress) -> dict:
    return dict(dtype=compute_dtype(model, dtype), mask_fn=mask_fn, autocast_dtype=autocast_dtype, progress=progress)


def _token_width(rows: dict[str, Rows]) -> int:
    widths = [int(r.positions.max()) + 1 for r in rows.values() if r.positions is not None and r.positions.numel()]
    return max(widths, default=1)


def pairwise_scores(
    model: nn.Module,
    factors: Factors,
    queries: Iterable[Any],
    documents: Iterable[Any],
    *,
    loss_fn: Callable,
    measurement_fn: Callable | None = None,
    damping: float | None = None,
    per_token: bool = False,
    query_rank: int | None = None,
    modules: Sequence[str | TrackedModule] | None = None,
    mask_fn: Callable[[Any], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
):
    """Influence of every document on every query: a [queries, documents] tensor (on the CPU).

    Args:
        factors: from :func:`fit_factors` (or :meth:`Factors.load`) on this model.
        queries, documents: iterables of batches; score columns follow the documents' order.
        loss_fn: the documents' summed loss ``loss_fn(model, batch)``.
        measurement_fn: the queries' summed measurement (default: ``loss_fn``), e.g. −log p(completion).
        damping: None = 0.1 × the mean curvature of each layer; a number = that damping for every layer.
        per_token: also return per-token contributions [queries, documents, tokens] (zero-padded) that sum
            to the scores: the result is then ``(scores, contributions)``.
        query_rank: keep each query's preconditioned gradient as a rank-R approximation (SVD) per layer.
        modules: the tracked modules, if they cannot be found by the names the factors hold.
        mask_fn, dtype, autocast_dtype, progress: as in :func:`fit_factors`.
    """
    measurement_fn = loss_fn if measurement_fn is None else measurement_fn
    tracked = tracked_for(model, factors, modules)
    common = _options(model, dtype, mask_fn, autocast_dtype, progress)
    pre = _preconditioner(factors, damping, tracked, common["dtype"], model_device(model))
    cols = []
    with evaluating(model):
        qg = query_gradients(model, tracked, pre, queries, measurement_fn, query_rank=query_rank, common=common)
        for index, rows, n in run_pass(model, documents, tracked, loss_fn, what="loss_fn", pass_id=2,
                                       desc="influence: documents", **common):
            with torch.no_grad():
                scores = torch.zeros(qg.n, n, dtype=common["dtype"], device=model_device(model))
                tokens = scores.new_zeros(qg.n, n, _token_width(rows)) if per_token else None
                for key, r in rows.items():
                    part = qg.scores(key, r)
                    if not bool(torch.isfinite(part).all()):
                        raise NumericalError(
                            f"scores of layer {key!r} on document batch {index} are not finite; the gradients "
                            "overflowed: run in float32, check the batch for NaN, or use a larger damping"
                        )
                    scores += part
                    if per_token:
                        if r.positions is None:
                            raise InputError(
                                f"per-token scores need token rows, but tracked layer {key!r} takes inputs that "
                                "are not [batch, tokens, features]; leave it out (modules=) or per_token=False"
                            )
                        contrib = qg.token_scores(key, r)
                        pos = r.token_positions().clamp(min=0).unsqueeze(0).expand_as(contrib)
                        tokens.scatter_add_(2, pos, contrib)
            cols.append((index, scores.cpu(), tokens.cpu() if per_token else None))
    return _assemble(cols, per_token)


def _assemble(cols: list, per_token: bool):
    cols = sorted(distributed.gather_objects(cols), key=lambda c: c[0])
    if not cols:
        raise InputError("documents gave no batches; pass a non-empty iterable of document batches")
    scores = torch.cat([c[1] for c in cols], dim=-1)
    if not per_token:
        return scores
    width = max(c[2].shape[-1] for c in cols)
    tokens = torch.cat([torch.nn.functional.pad(c[2], (0, width - c[2].shape[-1])) for c in cols], dim=1)
    return scores, tokens


def self_scores(
    model: nn.Module,
    factors: Factors,
    documents: Iterable[Any],
    *,
    loss_fn: Callable,
    damping: float | None = None,
    modules: Sequence[str | TrackedModule] | None = None,
    mask_fn: Callable[[Any], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Each document's influence on its own loss, ``⟨P⁻¹∇L(d), ∇L(d)⟩``: a [documents] tensor (CPU)."""
    tracked = tracked_for(model, factors, modules)
    common = _options(model, dtype, mask_fn, autocast_dtype, progress)
    pre = _preconditioner(factors, damping, tracked, common["dtype"], model_device(model))
    cols = []
    with evaluating(model):
        for index, rows, n in run_pass(model, documents, tracked, loss_fn, what="loss_fn", pass_id=3,
                                       desc="influence: self", **common):
            with torch.no_grad():
                scores = torch.zeros(n, dtype=common["dtype"], device=model_device(model))
                for key, r in rows.items():
                    o, i = r.s.shape[-1], r.a.shape[-1]
                    members = r.a.shape[0] if r.stacked else 1
                    step = max(1, CHUNK_ELEMENTS // (members * o * i))
                    for start in range(0, n, step):
                        part = r.select(slice(start, start + step))
                        own = (pre.rows(key, part) * part.per_example_gradient()).sum((-2, -1))
                        scores[start:start + step] += own.sum(0) if r.stacked else own
                if not bool(torch.isfinite(scores).all()):
                    raise NumericalError(f"self-scores of document batch {index} are not finite; use a larger damping")
            cols.append((index, scores.cpu(), None))
    return _assemble(cols, False)
