"""Sharding the estimator's passes over ranks with torch.distributed (torchrun; gloo on CPU, NCCL on GPU).

When a process group is initialized, each rank reads every ``world``-th batch of the documents (batch ``i``
goes to rank ``i % world``), sums of factor statistics are all-reduced, finished factors are broadcast from
rank 0 (so every rank preconditions with the same numbers), and score columns are gathered back in the
documents' order. Without a process group everything runs in the one process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
    """(global index, batch) for this rank's share of ``batches``."""
    r, w = rank(), world_size()
    for i, batch in enumerate(batches):
        if i % w == r:
            yield i, batch


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU tensors only.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks (in place semantics, new tensors returned on the original devices)."""
    if not active():
        return tensors
    out = {}
    for k in sorted(tensors):  # same order on every rank
        t = tensors[k]
        buf = t.to(_comm_device(t)).contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out[k] = buf.to(t.device)
    return out


def broadcast(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank (shapes must already agree)."""
    if not active():
        return tensors
    out = {}
    for k in sorted(tensors):
        t = tensors[k]
        buf = t.to(_comm_device(t)).contiguous()
        dist.broadcast(buf, src=0)
        out[k] = buf.to(t.device)
    return out


def gather_objects(local: list) -> list:
    """Every rank's list, concatenated (rank order)."""
    if not active():
        return local
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]
