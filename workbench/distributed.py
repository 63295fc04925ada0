"""Ranks of a torch.distributed job (torchrun; gloo on CPU, NCCL on GPU): who am I, shard, reduce, gather.

Two users: the influence estimator shards its passes (batch ``i`` goes to rank ``i % world``), all-reduces sums
of factor statistics, broadcasts finished factors from rank 0 and gathers score columns back in the documents'
order; :func:`workbench.measure.measure` gives ranks different checkpoints, or shares one checkpoint's batches
among them (:mod:`workbench.sharding`). Without a process group everything runs in the one process.

Inside :func:`local` this process behaves as a lone one (:func:`active` is False): a rank measuring a checkpoint
of its own runs the estimator unsharded, since the other ranks are busy with other checkpoints and would never
join its collectives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

_LOCAL = [0]  # depth of local() blocks


def active() -> bool:
    return not _LOCAL[0] and dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within: this rank computes alone (no collectives), as a process without a group would."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or another launcher setting the same
    environment: ``WORLD_SIZE`` above 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device | None = None, timeout_s: float = 1800) -> bool:
    """Start the process group torchrun describes in the environment, unless one is running or this is a lone
    process; NCCL for CUDA devices, gloo otherwise. True when this call started it (the caller then ends it with
    ``dist.destroy_process_group()``)."""
    if not launched() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) under torchrun; other devices as given."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(local: list) -> list:
    """Every rank's list, concatenated (rank order)."""
    if not active():
        return local
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def gather_to_main(obj: Any) -> list | None:
    """Every rank's ``obj`` on rank 0 (rank order), None on the others; cheaper than :func:`gather_objects` when
    only rank 0 needs them."""
    if not active():
        return [obj]
    parts: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def barrier() -> None:
    if active():
        dist.barrier()


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 alone and hand its result to every rank. When it raises, rank 0 raises it and every
    other rank raises :class:`~workbench.errors.WorkbenchError` saying so, instead of waiting forever in the next
    collective."""
    if not active():
        return fn()
    result = error = None
    if is_main():
        try:
            with local():
                result = fn()
        except BaseException as exc:
            error = exc
    status = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if status is not None:
        raise WorkbenchError(f"rank 0 failed ({status}); this rank stops too")
    return broadcast_object(result)


__all__ = ["active", "all_reduce_sum", "barrier", "broadcast", "broadcast_object", "gather_objects",
           "gather_to_main", "init_from_env", "is_main", "launched", "local", "local_device", "on_main", "rank",
           "shard", "world_size"]
