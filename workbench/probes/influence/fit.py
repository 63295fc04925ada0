"""Fitting the factors: a covariance pass (kfac, ekfac) and a corrected-eigenvalue pass (diagonal, ekfac).

Statistics follow kronfluence's conventions so the two agree: ``A`` and ``S`` are means over (unmasked)
tokens, ``lambda`` a mean over examples of per-example gradients in the eigenbasis, squared.

Two savings over reading the documents twice and rotating per-example gradients: ekfac keeps the covariance
pass's token rows (within ``cache_bytes``) for its eigenvalue pass, and rotates rows rather than per-example
gradients when that is cheaper (:func:`~workbench.probes.influence.precondition.rotate`). A stack of blocks
(an MoE layer's experts) is fitted with batched operations on ``[members, ...]`` tensors and stored per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from workbench.errors import InputError, NumericalError
from workbench.probes.influence import distributed, idle
from workbench.probes.influence.factors import FISHERS, STRATEGIES, Factors, check_finite, eigen
from workbench.probes.influence.passes import compute_dtype, evaluating, model_device, run_pass
from workbench.probes.influence.precondition import rotate
from workbench.gradients.tasks import accepts_sample
from workbench.gradients.tracking import Block, Rows, TrackedModule, resolve_modules, tracking_report, units

#: Elements of one chunk of per-example [out, in] matrices (bounds memory; 2**25 floats = 128 MiB).
CHUNK_ELEMENTS = 2**25


def fit_factors(
    model: nn.Module,
    documents: Iterable[Any] | None,
    *,
    loss_fn: Callable,
    strategy: str = "ekfac",
    modules: Sequence[str | TrackedModule] | None = None,
    fisher: str = "true",
    mask_fn: Callable[[Any], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    cache_bytes: int = 2**31,
    idle_experts: str = "drop",
    progress: bool = True,
    report: bool = True,
) -> Factors:
    """Fit the curvature factors of the tracked layers on ``documents``.

    Args:
        model: the model, on the device to compute on (batches are moved to it).
        documents: an iterable of batches (a list or a DataLoader; ekfac reads it twice). Unused for identity.
        loss_fn: ``loss_fn(model, batch)`` → the batch's loss summed over examples and tokens; for the true
            Fisher it must also take ``sample=True`` and then use labels drawn from the model
            (:class:`~workbench.probes.influence.CrossEntropyTask` does).
        strategy: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        modules: None = every trackable module (every nn.Linear); or module names / TrackedModule objects.
        fisher: ``"true"`` (labels sampled from the model, default) or ``"empirical"`` (the data's labels).
        mask_fn: ``mask_fn(batch)`` → [B, T] with 1 for real tokens; padding rows are left out of the statistics.
        dtype: dtype of the statistics (default float32; float64 for a float64 model).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward pass under autocast (GPU).
        seed: seeds the sampled labels (per batch, so sharding does not change them; both ekfac passes draw
            the same labels for a batch).
        cache_bytes: ekfac keeps the token rows of the covariance pass, up to this many bytes (per rank, on
            the model's device), so that its eigenvalue pass needs no second forward and backward pass over
            the documents; beyond it (or with 0) the documents are read again. Same result either way.
        idle_experts: ``"drop"`` (default): experts (of :class:`~workbench.gradients.moe.TrackedExperts`) whose
            gradient is zero on every document, as the covariance pass finds (:mod:`.idle`), are left out of
            the factors with an IdleExpertsWarning, and scoring with the same modules leaves them out too
            (they add nothing to any score); ``"raise"``: a NumericalError, as for any layer without curvature.
        progress: show progress bars. report: print which parameters are tracked.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if idle_experts not in ("drop", "raise"):
        raise InputError(f"idle_experts must be 'drop' or 'raise', not {idle_experts!r}")
    if fisher not in FISHERS:
        raise InputError(f"fisher must be 'true' (labels sampled from the model) or 'empirical', not {fisher!r}")
    sample = fisher == "true"
    if sample and strategy != "identity" and not accepts_sample(loss_fn):
        raise InputError(
            "fisher='true' needs labels sampled from the model, but loss_fn takes no 'sample' keyword: give a "
            "loss_fn(model, batch, sample=False) that draws labels from the model when sample=True (e.g. "
            "CrossEntropyTask(...).loss), or use fisher='empirical'"
        )
    tracked = resolve_modules(model, modules)
    blocks = [b for t in tracked for b in t.blocks()]
    rep = tracking_report(model, tracked)
    if report and distributed.is_main():
        print(rep)
    dtype = compute_dtype(model, dtype)
    factors = Factors(strategy, fisher, [t.name for t in tracked], {b.key: (b.out_dim, b.in_dim) for b in blocks},
                      {b.key: {} for b in blocks}, report=rep)
    if strategy == "identity":
        return factors
    common = dict(what="loss_fn", dtype=dtype, sample=sample, seed=seed, mask_fn=mask_fn,
                  autocast_dtype=autocast_dtype, progress=progress)
    with evaluating(model):
        cached = None
        if strategy in ("kfac", "ekfac"):
            budget = cache_bytes if strategy == "ekfac" else 0
            cached, tracked = _fit_covariances(model, documents, tracked, loss_fn, factors, common, budget,
                                               idle_experts == "drop")
        if strategy in ("diagonal", "ekfac"):
            _fit_lambda(model, documents, tracked, loss_fn, factors, common, cached)
    return factors


def _rows_bytes(rows: dict[str, Rows]) -> int:
    return sum(r.a.numel() * r.a.element_size() + r.s.numel() * r.s.element_size() for r in rows.values())


def _lead(bs: list[Block]) -> tuple[int, ...]:
    """The leading dimension of a unit's tensors: (members,) for a stack, none for a single block."""
    return (len(bs),) if bs[0].stack is not None else ()


def _per_block(bs: list[Block], t: torch.Tensor) -> list[tuple[Block, torch.Tensor]]:
    """A unit's tensor split into its blocks' (copies, so that each block's tensors are its own)."""
    return [(bs[0], t)] if bs[0].stack is None else [(b, x.clone()) for b, x in zip(bs, t)]


def _fit_covariances(model, documents, tracked, loss_fn, factors: Factors, common: dict, cache_bytes: int,
                     drop_idle: bool) -> tuple[list | None, list[TrackedModule]]:
    """Fill in the eigenbases; return the pass's rows when they fit in ``cache_bytes`` (else None) and the
    tracked modules (without idle experts when ``drop_idle``)."""
    device, dtype = model_device(model), common["dtype"]
    sums: dict[str, torch.Tensor] = {}
    groups = units(tracked)
    for key, bs in groups.items():
        g, b = _lead(bs), bs[0]
        sums[f"{key}::A"] = torch.zeros(g + (b.in_dim, b.in_dim), dtype=dtype, device=device)
        sums[f"{key}::S"] = torch.zeros(g + (b.out_dim, b.out_dim), dtype=dtype, device=device)
        sums[f"{key}::tokens"] = torch.zeros(g, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # batches, examples
    cache: list | None = [] if cache_bytes > 0 else None
    used = 0
    for _, rows, n in run_pass(model, documents, tracked, loss_fn, pass_id=0, desc="influence: covariances", **common):
        counts += torch.tensor([1.0, n], dtype=torch.float64, device=device)
        if cache is not None:
            used += _rows_bytes(rows)
            if used <= cache_bytes:
                cache.append((rows, n))
            else:
                cache = None
        with torch.no_grad():
            for key, r in rows.items():
                if r.stacked:  # packed rows [G, R, dim]: every member's covariance in one batched product
                    _add_stacked(sums, key, r)
                    continue
                a, s = r.a.reshape(-1, r.a.shape[-1]), r.s.reshape(-1, r.s.shape[-1])
                sums[f"{key}::A"].addmm_(a.T, a)
                sums[f"{key}::S"].addmm_(s.T, s)
                sums[f"{key}::tokens"] += r.valid.sum()
    sums["__counts"] = counts
    sums = distributed.all_reduce_sum(sums)
    if int(sums["__counts"][0]) == 0:
        raise InputError("documents gave no batches; pass a non-empty iterable of batches (a list or a DataLoader)")
    factors.n_examples = int(sums["__counts"][1])
    if drop_idle:
        tracked, groups, cache = _without_idle(model, tracked, groups, sums, factors, cache)
    # Every rank decomposes the same summed matrices (so a numerical error stops every rank), then takes
    # rank 0's result, so that all ranks precondition with identical numbers.
    eig: dict[str, torch.Tensor] = {}
    for key, bs in groups.items():
        tokens = sums[f"{key}::tokens"]
        for b, n in zip(bs, tokens.reshape(-1).tolist()):
            factors.n_tokens[b.key] = int(n)
        names = [b.key for b in bs] if bs[0].stack is not None else key
        for what, side in (("A", "activation"), ("S", "gradient")):
            values, vectors = eigen(sums[f"{key}::{what}"], tokens, side, names)
            eig[f"{key}::{side}_eigenvalues"] = values
            eig[f"{key}::{side}_eigenvectors"] = vectors.to(dtype)
    eig = distributed.broadcast(eig)
    for name, t in eig.items():
        key, part = name.rsplit("::", 1)
        for b, x in _per_block(groups[key], t):
            factors.tensors[b.key][part] = x
    return cache, tracked


def _add_stacked(sums: dict, key: str, r) -> None:
    """A stack's covariance sums updated with one batch's packed rows; members (experts) that got no row in
    the batch are skipped (their rows are all filler)."""
    got = r.valid.any(1)
    sums[f"{key}::tokens"] += r.valid.sum(1)
    if bool(got.all()):
        sums[f"{key}::A"].baddbmm_(r.a.mT, r.a)
        sums[f"{key}::S"].baddbmm_(r.s.mT, r.s)
        return
    use = got.nonzero().squeeze(1)
    if use.numel():
        a, s = r.a[use], r.s[use]
        sums[f"{key}::A"].index_add_(0, use, torch.bmm(a.mT, a))
        sums[f"{key}::S"].index_add_(0, use, torch.bmm(s.mT, s))


def _without_idle(model, tracked, groups, sums, factors: Factors, cache):
    """Leave out the experts with a zero gradient on every document (:mod:`.idle`): from the tracked modules,
    the summed covariances, the cached rows and the factors' blocks; warn naming them."""
    stacks = {key: sums[f"{key}::S"] for key, bs in groups.items() if bs[0].stack is not None}
    zero = idle.zero_gradient_blocks(stacks, {key: [b.key for b in groups[key]] for key in stacks})
    kept, names = idle.leave_out(tracked, zero)
    if not names:
        return tracked, groups, cache
    if not kept:
        raise InputError("every tracked layer had a zero gradient on every document; is the loss connected to them?")
    new = units(kept)
    gone = {b.key for bs in groups.values() for b in bs} - {b.key for bs in new.values() for b in bs}
    for key, bs in groups.items():
        if key in new and len(new[key]) == len(bs):
            continue
        keys = [b.key for b in new.get(key, [])]
        keep = torch.tensor([i for i, b in enumerate(bs) if b.key in set(keys)], dtype=torch.long,
                            device=sums[f"{key}::S"].device)
        for part in ("A", "S", "tokens"):
            name = f"{key}::{part}"
            if key in new:
                sums[name] = sums[name][keep]
            else:
                del sums[name]
        for rows, _ in cache or []:
            if key in rows:
                if key in new:
                    rows[key] = idle.members(rows[key], keep.to(rows[key].a.device))
                else:
                    del rows[key]
    for key in gone:
        del factors.shapes[key], factors.tensors[key]
    factors.idle = sorted(gone)
    factors.report = tracking_report(model, kept)
    idle.warn(names)
    return kept, new, cache


def _fit_lambda(model, documents, tracked, loss_fn, factors: Factors, common: dict,
                cached: list | None) -> None:
    device, dtype = model_device(model), common["dtype"]
    ekfac = factors.strategy == "ekfac"
    groups = units(tracked)
    sums = {key: torch.zeros(_lead(bs) + (bs[0].out_dim, bs[0].in_dim), dtype=dtype, device=device)
            for key, bs in groups.items()}
    bases = {}
    if ekfac:
        def basis(bs, part):  # a stack's bases stacked: [G, d, d]
            t = [factors.tensors[b.key][part].to(device, dtype) for b in bs]
            return torch.stack(t) if bs[0].stack is not None else t[0]

        bases = {key: (basis(bs, "gradient_eigenvectors"), basis(bs, "activation_eigenvectors"))
                 for key, bs in groups.items()}
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    # pass_id 0 again: the same sampled labels as the covariance pass, whether its rows were cached or not.
    batches = ((rows, n) for rows, n in cached) if cached is not None else (
        (rows, n) for _, rows, n in run_pass(model, documents, tracked, loss_fn, pass_id=0,
                                             desc="influence: eigenvalues", **common))
    for rows, n in batches:
        counts += torch.tensor([1.0, n], dtype=torch.float64, device=device)
        with torch.no_grad():
            for key, r in rows.items():
                step = max(1, CHUNK_ELEMENTS // sums[key].numel())
                for start in range(0, r.n_examples, step):
                    part = r.select(slice(start, start + step))
                    # Summed over examples: a stack's may come in any order (saves putting them back in order).
                    if ekfac:
                        g = rotate(part, *bases[key], ordered=False)
                    else:
                        g = part.products(part.s, part.a).transpose(0, 1) if part.stacked else part.per_example_gradient()
                    sums[key] += g.square_().sum(-3)  # g is this step's own tensor: squared in place
    sums["__counts"] = counts
    sums = distributed.all_reduce_sum(sums)
    n_batches, n_examples = int(sums["__counts"][0]), int(sums["__counts"][1])
    if n_batches == 0:
        raise InputError(
            "documents gave no batches" + (" on the second pass: ekfac reads the documents twice, so pass a list "
            "or a DataLoader, not a generator" if ekfac else "; pass a non-empty iterable of batches")
        )
    factors.n_examples = n_examples
    for key, bs in groups.items():
        lam = sums[key].to(torch.float64) / n_examples
        flat = lam.reshape(len(bs), -1)
        if not bool((torch.isfinite(flat).all(1) & (flat.sum(1) > 0)).all()):  # one check per unit
            for b, x in _per_block(bs, lam):
                check_finite(x, "corrected eigenvalues" if ekfac else "gradient second moments", b.key)
                if not bool(x.sum() > 0):
                    raise NumericalError(
                        f"layer {b.key!r} had a zero gradient on every document: it did not run, its activations "
                        "are all zero, or it does not affect the loss. Leave it out (modules=) or use a larger "
                        "explicit damping"
                    )
        for b, x in _per_block(bs, lam):
            factors.tensors[b.key]["lambda"] = x
