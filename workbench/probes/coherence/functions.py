"""Gradient coherence (Chatterjee & Zielinski, arXiv 2203.10036): pure functions.

For per-example gradients g_1 … g_m of a set of m examples,

    α = ‖E[g]‖² / E[‖g‖²] = ‖Σ g‖² / (m · Σ ‖g‖²),   m-coherence = m · α = ‖Σ g‖² / Σ ‖g‖².

m-coherence is the paper's α_m / α_m^⊥, where α_m^⊥ = 1/m is the α of m mutually orthogonal gradients (of any
norms): it is 1 for orthogonal gradients and m for identical ones, and it reads as "how many examples of the
set a small step along one example's gradient helps, on average". Both need only two running sums per tracked
weight matrix, Σ g (the ordinary summed gradient) and Σ ‖g‖² (a number), so no per-example gradient is kept.

Σ ‖g_n‖² comes from what one backward pass gives for a tracked matrix (the rows of
:mod:`workbench.gradients.tracking`: inputs ``a`` and output gradients ``s`` of each example's rows): the
example's gradient is G_n = Σ_t s_t a_tᵀ, and ‖G_n‖² = Σ_{t,t'} (a_t·a_t')(s_t·s_t'), which costs rows² ·
(in + out) per example instead of rows · in · out for G_n itself; :func:`row_sums` takes whichever is cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from workbench.errors import InputError
from workbench.gradients.tracking import Rows, StackedRows
from workbench.samples import IGNORE, SampleSet


# --- from explicit gradients (the definition; used by the tests as the reference) ---------------------------
def coherence(grads: torch.Tensor) -> tuple[float, float]:
    """(α, m-coherence) of per-example gradients ``grads`` [m, ...] (each row flattened).

    NaN for both when every gradient is zero (no direction to agree on)."""
    if grads.dim() < 1 or grads.shape[0] < 1:
        raise InputError("coherence needs at least one per-example gradient, as a tensor [examples, ...]")
    g = grads.reshape(grads.shape[0], -1).double()
    return from_sums(float(g.sum(0).square().sum()), float(g.square().sum()), g.shape[0])


def from_sums(sum_norm_sq: float, norm_sq_sum: float, m: int) -> tuple[float, float]:
    """(α, m-coherence) from ‖Σ g‖² (``sum_norm_sq``), Σ ‖g‖² (``norm_sq_sum``) and the number of examples."""
    if m < 1:
        raise InputError(f"coherence needs at least one example, got m = {m}")
    if norm_sq_sum < 0 or sum_norm_sq < 0:
        raise InputError(f"squared norms cannot be negative (got {sum_norm_sq}, {norm_sq_sum})")
    if norm_sq_sum == 0:
        return math.nan, math.nan
    m_coherence = sum_norm_sq / norm_sq_sum
    return m_coherence / m, m_coherence


# --- from the rows of one backward pass ----------------------------------------------------------------------
def _ghost_is_cheaper(rows_per_example: int, d_in: int, d_out: int) -> bool:
    # ‖Σ_t s_t a_tᵀ‖² through the two [rows, rows] Gram matrices costs rows²·(in+out) per example; forming the
    # [out, in] gradient costs rows·in·out (and a pass over it).
    return rows_per_example * (d_in + d_out) < d_in * d_out


def row_sums(rows: Rows | StackedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_n G_n and Σ_n ‖G_n‖² over the examples of one batch, for one tracked matrix (``Rows``: ``[out, in]``
    and a scalar) or for every member of a stack (``StackedRows``: ``[G, out, in]`` and ``[G]``).

    Padding and filler rows are zero in the rows the recorder hands back, so they add nothing."""
    if isinstance(rows, StackedRows):
        a, s = rows.a, rows.s  # [G, R, in], [G, R, out], zero where not valid
        if rows.width == 0:
            return torch.bmm(s.mT, a), a.new_zeros(a.shape[0])
        if _ghost_is_cheaper(rows.width, a.shape[-1], s.shape[-1]):
            ca, cs = rows.cells(a), rows.cells(s)  # [B, G, width, d]: each (example, member) cell's rows
            gram = torch.matmul(ca, ca.mT).mul_(torch.matmul(cs, cs.mT))
            return torch.bmm(s.mT, a), gram.sum((0, 2, 3))
        per = rows.products(s, a)  # [B, G, out, in]: each (example, member) cell's gradient
        # a norm over several dimensions reads the tensor once, without the temporary of per.square()
        return per.sum(0), torch.linalg.vector_norm(per, dim=(0, 2, 3)).square()
    a, s = rows.a, rows.s  # [B, T, in], [B, T, out]
    if _ghost_is_cheaper(a.shape[1], a.shape[-1], s.shape[-1]):
        gram = torch.bmm(a, a.mT).mul_(torch.bmm(s, s.mT))
        return s.flatten(0, 1).T @ a.flatten(0, 1), gram.sum()
    per = torch.bmm(s.mT, a)  # [B, out, in]: each example's gradient; their sum is the batch's
    flat = per.reshape(-1)
    return per.sum(0), torch.dot(flat, flat)


@dataclass
class GradientSums:
    """Running sums of one set of examples: ``n`` examples so far, and per tracked unit (a weight matrix, or a
    stack of experts' matrices) Σ g (``grad``) and Σ ‖g‖² (``norm_sq``), in float64.

    Feed it batch by batch with :meth:`add_rows`; sums do not depend on how the set was cut into batches."""

    n: int = 0
    grad: dict[str, torch.Tensor] = field(default_factory=dict)
    norm_sq: dict[str, float] = field(default_factory=dict)

    def add_rows(self, rows: dict[str, Rows | StackedRows], n_examples: int) -> None:
        """Add one batch: the recorder's rows per unit and the number of examples in the batch."""
        for key, r in rows.items():
            total, sq = row_sums(r)
            total = total.detach().double()
            self.grad[key] = self.grad[key] + total if key in self.grad else total
            self.norm_sq[key] = self.norm_sq.get(key, 0.0) + float(sq.double().sum())
        self.n += n_examples

    def merge(self, other: "GradientSums") -> "GradientSums":
        """The sums of the union of two disjoint sets."""
        out = GradientSums(self.n + other.n, dict(self.grad), dict(self.norm_sq))
        for key, g in other.grad.items():
            out.grad[key] = out.grad[key] + g if key in out.grad else g
            out.norm_sq[key] = out.norm_sq.get(key, 0.0) + other.norm_sq[key]
        return out

    def coherence(self, keys: Iterable[str] | None = None) -> tuple[float, float]:
        """(α, m-coherence) over the units ``keys`` (default: all). Units are disjoint sets of parameters, so
        the squared norms of their concatenation are sums over units."""
        keys = list(self.grad) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.grad]
        if missing:
            raise InputError(f"no gradient sums for {missing}; the tracked units are {sorted(self.grad)}")
        sum_norm_sq = sum(float(self.grad[k].square().sum()) for k in keys)
        return from_sums(sum_norm_sq, sum(self.norm_sq[k] for k in keys), self.n)

    def mean_norm_sq(self, keys: Iterable[str] | None = None) -> float:
        """E[‖g‖²] over the units ``keys`` (default: all)."""
        keys = list(self.grad) if keys is None else list(keys)
        return sum(self.norm_sq[k] for k in keys) / self.n if self.n else math.nan


# --- the random-label control ----------------------------------------------------------------------------------
def random_labels(samples: SampleSet, seed: int = 0, classes: Sequence[int] | None = None) -> SampleSet:
    """A copy of ``samples`` whose every scored target is drawn uniformly from ``classes`` (default: the
    distinct scored targets of the set), with a generator seeded by ``seed``: the same copy every time.

    Inputs, ids and groups are kept; a drawn label may equal the true one, as with the random labels of Zhang
    et al. (2017) that the coherence papers train on."""
    scored = sorted({t for ys in samples.targets for t in ys if t != IGNORE})
    pool = torch.tensor(sorted(set(classes)) if classes is not None else scored, dtype=torch.long)
    if pool.numel() < 2:
        raise InputError(f"random labels need at least two classes to draw from, got {pool.tolist()}")
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for ys in samples.targets:
        y = torch.tensor(ys, dtype=torch.long)
        keep = y != IGNORE
        drawn = pool[torch.randint(len(pool), (int(keep.sum()),), generator=gen)]
        y[keep] = drawn
        targets.append(y.tolist())
    return SampleSet(ids=list(samples.ids), groups=list(samples.groups), input_ids=[list(x) for x in samples.input_ids],
                     targets=targets)


__all__ = ["GradientSums", "coherence", "from_sums", "random_labels", "row_sums"]
