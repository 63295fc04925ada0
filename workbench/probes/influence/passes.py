"""One pass of a loss over batches: each batch's forward pass, one backward pass, and the tracked rows.

Shared by fitting, scoring and TracIn. Handles the device (batches follow the model), autocast (bf16 on a
GPU when asked), the padding mask, the per-batch seed for sampled labels, the rank's shard of the batches
and the progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.errors import InputError
from workbench.probes.influence import distributed
from workbench.gradients.tasks import batch_seed, call_scalar, seeded, to_device
from workbench.gradients.tracking import Recorder, Rows, TrackedModule


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """float64 for a float64 model, else float32 (statistics of bf16/fp16 models are kept in float32)."""
    if dtype is not None:
        return dtype
    p = next(iter(model.parameters()), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


@contextmanager
def evaluating(model: nn.Module):
    """The model in eval mode (no dropout) for the duration; its mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _n_examples(rows: dict[str, Rows], index: int) -> int:
    sizes = {k: r.n_examples for k, r in rows.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(
            f"tracked layers saw different batch sizes in batch {index}: {sizes}; every tracked layer must take "
            "batch-first inputs (a custom tracker reporting token rows must pass n_examples=)"
        )
    return next(iter(sizes.values()))


def run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    tracked: Sequence[TrackedModule],
    fn: Callable,
    *,
    what: str,
    dtype: torch.dtype,
    sample: bool = False,
    seed: int = 0,
    pass_id: int = 0,
    mask_fn: Callable[[Any], torch.Tensor] | None = None,
    autocast_dtype: torch.dtype | None = None,
    sharded: bool = True,
    progress: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[int, dict[str, Rows], int]]:
    """Yield (global batch index, rows per block, examples in the batch) for this rank's batches."""
    if batches is None:
        raise InputError(f"no batches given for {what}; pass an iterable of batches (a list or a DataLoader)")
    device = model_device(model)
    items = distributed.shard(batches) if sharded else enumerate(batches)
    total = len(batches) if hasattr(batches, "__len__") else None
    if total is not None and sharded:
        total = math.ceil(max(total - distributed.rank(), 0) / distributed.world_size())
    bar = tqdm(items, total=total, desc=desc, leave=False, disable=not progress or not distributed.is_main())

    def amp():
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    with Recorder(tracked, dtype) as rec, torch.enable_grad():
        for index, batch in bar:
            batch = to_device(batch, device)
            rec.start()
            with seeded(batch_seed(seed, pass_id, index), device) if sample else nullcontext(), amp():
                value = call_scalar(fn, model, batch, sample=sample, what=what, index=index)
            mask = mask_fn(batch) if mask_fn is not None else None
            rows = rec.rows(value, mask)
            yield index, rows, _n_examples(rows, index)
