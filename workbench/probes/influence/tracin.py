"""TracIn-CP (Pruthi et al. 2020), the checkpoint baseline: ``Σ_t η_t ⟨∇m(θ_t, q), ∇L(θ_t, d)⟩``.

The same per-example gradient machinery as the influence scores with the identity strategy, summed over a
run's checkpoints (loaded one at a time) weighted by each checkpoint's learning rate. Positive means the
document's gradient step lowered the query's measurement, the influence scores' sign.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.checks import is_number
from workbench.errors import InputError
from workbench.probes.influence import distributed
from workbench.probes.influence.fit import fit_factors
from workbench.probes.influence.scores import pairwise_scores
from workbench.gradients.tracking import TrackedModule
from workbench.runs import Run


def _models(checkpoints, steps, device) -> tuple[int | None, Iterable[nn.Module]]:
    if isinstance(checkpoints, Run):
        chosen = [s for s in checkpoints.steps if steps is None or s in steps]
        if not chosen:
            raise InputError(f"none of steps {list(steps)} is a checkpoint of run {checkpoints.name!r}; its steps are "
                             f"{checkpoints.steps}")
        return len(chosen), (m for _, m in checkpoints.models(steps=chosen, device=device))
    if isinstance(checkpoints, nn.Module):
        return 1, [checkpoints]
    models = list(checkpoints)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise InputError("checkpoints must be a Run or a non-empty sequence of models (nn.Module)")
    return len(models), models


def tracin_scores(
    checkpoints: Any,
    queries: Iterable[Any],
    documents: Iterable[Any],
    *,
    loss_fn: Callable,
    measurement_fn: Callable | None = None,
    learning_rates: float | Sequence[float] = 1.0,
    modules: Sequence[str | TrackedModule] | None = None,
    steps: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    mask_fn: Callable[[Any], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """TracIn-CP scores [queries, documents] over a Run's checkpoints (or a sequence of models).

    ``learning_rates`` is one number for every checkpoint or one per checkpoint; ``steps`` picks checkpoints
    of a Run; ``device`` is where a Run's checkpoints are loaded. ``modules`` as in :func:`fit_factors`
    (default: every nn.Linear).
    """
    n, models = _models(checkpoints, steps, device)
    if is_number(learning_rates):
        rates = [float(learning_rates)] * n
    else:
        rates = [float(r) for r in learning_rates]
        if len(rates) != n:
            raise InputError(f"{len(rates)} learning rates for {n} checkpoints; give one per checkpoint or one number")
    total = None
    bar = tqdm(zip(rates, models), total=n, desc="tracin: checkpoints",
               disable=not progress or not distributed.is_main())
    for rate, model in bar:
        factors = fit_factors(model, None, loss_fn=loss_fn, strategy="identity", modules=modules, report=False)
        s = pairwise_scores(model, factors, queries, documents, loss_fn=loss_fn, measurement_fn=measurement_fn,
                            mask_fn=mask_fn, dtype=dtype, progress=False)
        total = rate * s if total is None else total + rate * s
    return total
