"""Idle experts: the experts that no document token with a gradient reached, found by the covariance pass.

An expert whose rows all have a zero output gradient over the documents (no token was routed to it, or only
tokens the loss does not depend on) has a zero gradient on every document: it adds nothing to any score and
has no curvature to fit (its gradient covariance is zero). The covariance pass already sums each expert's
``Σ s sᵀ``; its trace ``Σ |s|²`` is zero exactly for such an expert, so the pass itself tells which to leave
out, instead of a separate forward and backward pass over the documents before fitting
(:func:`~workbench.gradients.moe.routed_token_counts`, which :func:`~workbench.gradients.moe.lm_modules`
runs when given ``documents``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from workbench.gradients.moe import IdleExpertsWarning, TrackedExperts
from workbench.gradients.tracking import StackedRows, TrackedModule, pack_stack


def zero_gradient_blocks(s_sums: dict[str, torch.Tensor], members: dict[str, list[str]]) -> set[str]:
    """The block keys whose gradient covariance sum is zero: ``s_sums`` per stack [G, out, out], ``members``
    the stack's block keys in order."""
    out = set()
    for key, s in s_sums.items():
        zero = (s.diagonal(dim1=-2, dim2=-1).sum(-1) == 0).tolist()
        out |= {b for b, z in zip(members[key], zero) if z}
    return out


def leave_out(tracked: Sequence[TrackedModule], idle: set[str]) -> tuple[list[TrackedModule], list[str]]:
    """``tracked`` without the experts all of whose blocks are in ``idle`` (a tracker left with no expert is
    dropped), and the names of the experts left out (``<experts module>[e]``)."""
    kept, names = [], []
    for t in tracked:
        if not isinstance(t, TrackedExperts) or not idle:
            kept.append(t)
            continue
        params = [m.param for m in t.layout.matrices]
        gone = [e for e in t.experts if all(t.key(p, e) in idle for p in params)]
        if not gone:
            kept.append(t)
            continue
        names += [f"{t.name}[{e}]" for e in gone]
        rest = [e for e in t.experts if e not in set(gone)]
        if rest:
            kept.append(t.only(rest))
    return kept, names


def warn(names: list[str]) -> None:
    warnings.warn(f"{len(names)} experts got no document token the loss depends on and are left out of the "
                  f"factors and scores (their gradient is zero on every document): {', '.join(names[:8])}"
                  + (" ..." if len(names) > 8 else ""), IdleExpertsWarning, stacklevel=3)


def members(rows: StackedRows, keep: torch.Tensor) -> StackedRows:
    """The rows of the stack members ``keep`` (indices, in order) only, packed again."""
    return pack_stack(rows.a[keep], rows.s[keep], rows.example[keep], rows.positions[keep], rows.n_examples,
                      rows.valid[keep])
