"""Applying the damped inverse curvature to per-example gradients, one block at a time.

``P⁻¹(G) = Q_S ((Q_Sᵀ G Q_A) ⊘ (Λ + λ)) Q_Aᵀ`` for kfac and ekfac, ``G ⊘ (Λ + λ)`` for diagonal, ``G`` for
identity, with ``λ`` = 0.1 × mean(Λ) per block unless a damping is given. A stack of blocks (an MoE layer's
experts) is preconditioned member by member in batched products over ``[members, ...]`` tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workbench.errors import InputError, NumericalError
from workbench.probes.influence.factors import Factors, curvature, damping_for
from workbench.gradients.tracking import Rows, StackedRows


def _times(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x @ q`` member by member for a stack: x [G, ..., n, k], q [G, k, m] → [G, ..., n, m].

    One bmm over each member's rows; plain broadcasting (``x @ q[:, None]``) would first copy ``q`` once per
    example.
    """
    return torch.bmm(x.reshape(q.shape[0], -1, x.shape[-1]), q).view(*x.shape[:-1], q.shape[-1])


def rotate(r: Rows | StackedRows, q_s: torch.Tensor, q_a: torch.Tensor, ordered: bool = True) -> torch.Tensor:
    """``Q_Sᵀ G_n Q_A`` for every example of ``r``: [B, out, in], by the cheaper of two exact routes.

    With ``T`` rows per example, ``Q_Sᵀ G_n Q_A = (S_n Q_S)ᵀ (A_n Q_A)``: rotating the rows first costs
    ``T (in² + out²)`` per example against ``out · in · (out + in)`` for rotating ``G_n`` (an einsum path
    search would not find this, as ``G_n`` is a sum over rows). For a stack, ``r`` is its
    :class:`~workbench.gradients.tracking.StackedRows` and ``q_s``, ``q_a`` the members' bases [G, d, d];
    the result is [G, B, out, in], with the examples in an unspecified order unless ``ordered``.
    """
    i, o = q_a.shape[-1], q_s.shape[-1]
    if r.stacked:  # the packed rows (R per member) rotated before they are laid out per example
        if r.a.shape[1] * (i * i + o * o) < r.n_examples * o * i * (o + i):
            x = r.products(torch.bmm(r.s, q_s), torch.bmm(r.a, q_a))
            return r.in_order(x) if ordered else x.transpose(0, 1)
        return _times(_times(r.per_example_gradient(), q_a).mT, q_s).mT  # (Q_Aᵀ G_nᵀ Q_S)ᵀ
    t = r.a.shape[1]
    if t * (i * i + o * o) < o * i * (o + i):
        return torch.bmm((r.s @ q_s).transpose(1, 2), r.a @ q_a)
    return q_s.T @ r.per_example_gradient() @ q_a


class Preconditioner:
    """The damped inverse of each block's curvature, ready on one device in one dtype."""

    def __init__(self, factors: Factors, damping: float | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", stacks: Mapping[str, Sequence[str]] | None = None):
        """``stacks``: stack key → its member blocks, for :meth:`rows` of stacked rows (see ``tracking.units``)."""
        self.strategy = factors.strategy
        self.damping: dict[str, float] = {}
        self._inv: dict[str, torch.Tensor] = {}
        self._basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.strategy == "identity":
            return
        for key in factors.blocks:
            t = factors.tensors.get(key)
            if not t:
                raise InputError(f"the factors hold nothing for layer {key!r}; fit them again")
            lam = curvature(self.strategy, t).to(device=device, dtype=torch.float64)
            d = damping_for(self.strategy, t, damping, key)
            denom = lam + d
            if not bool((denom > 0).all()) or not bool(torch.isfinite(denom).all()):
                raise NumericalError(
                    f"curvature + damping of layer {key!r} is not positive everywhere (min {float(denom.min()):.3g} "
                    f"with damping {d:.3g}); use a larger damping"
                )
            self.damping[key] = d
            self._inv[key] = (1.0 / denom).to(dtype)
            if self.strategy in ("kfac", "ekfac"):
                self._basis[key] = (t["gradient_eigenvectors"].to(device=device, dtype=dtype),
                                    t["activation_eigenvectors"].to(device=device, dtype=dtype))
        # A stack's tensors stacked [G, ...] once; its members keep views into them (no second copy).
        for key, members in (stacks or {}).items():
            self._inv[key] = torch.stack([self._inv[m] for m in members])
            if members[0] in self._basis:
                self._basis[key] = tuple(torch.stack([self._basis[m][j] for m in members]) for j in (0, 1))
            for n, m in enumerate(members):
                self._inv[m] = self._inv[key][n]
                if key in self._basis:
                    self._basis[m] = (self._basis[key][0][n], self._basis[key][1][n])

    def __call__(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """Precondition gradients ``g`` [..., out, in] of block ``key``."""
        if self.strategy == "identity":
            return g
        inv = self._inv[key]
        if self.strategy == "diagonal":
            return g * inv
        q_s, q_a = self._basis[key]
        return q_s @ (((q_s.T @ g) @ q_a) * inv) @ q_a.T

    def rows(self, key: str, r: Rows | StackedRows) -> torch.Tensor:
        """Preconditioned per-example gradients [B, out, in] straight from a block's rows ([G, B, out, in] from a
        stack's, ``key`` the stack's key)."""
        if not r.stacked:
            if self.strategy in ("identity", "diagonal"):
                return self(key, r.per_example_gradient())
            q_s, q_a = self._basis[key]
            return q_s @ (rotate(r, q_s, q_a) * self._inv[key]) @ q_a.T
        if self.strategy == "identity":
            return r.per_example_gradient()
        inv = self._inv[key].unsqueeze(1)  # [G, 1, out, in]: one per member, for every example
        if self.strategy == "diagonal":
            return r.per_example_gradient() * inv
        q_s, q_a = self._basis[key]
        x = rotate(r, q_s, q_a) * inv
        return _times(_times(x, q_a.mT).mT, q_s.mT).mT  # Q_S X Q_Aᵀ = ((X Q_Aᵀ)ᵀ Q_Sᵀ)ᵀ
