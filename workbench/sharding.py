"""How :func:`workbench.measure.measure` shares a checkpoint series among the ranks of a torchrun job.

Checkpoints are the natural unit: each rank loads its own on its own device and writes its parts (atomically,
as a lone process does) into the one store, under the one writer lock that the ranks share as one job
(:mod:`workbench.lock`). Of ``n`` unfinished checkpoints, the first ``world * (n // world)`` go round-robin to
the ranks (:attr:`Plan.own`); the rest, fewer than the ranks, would leave ranks idle, so all ranks share each
of them (:attr:`Plan.shared`): every rank captures every ``world``-th batch (the batches a lone capture makes,
so each number is computed exactly as it would be alone), :func:`gather_capture` assembles the capture on
rank 0, and rank 0 measures and writes the one part. A killed rank leaves its finished parts whole, and a
rerun measures what is missing.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from workbench import distributed
from workbench.capture import Capture
from workbench.errors import WorkbenchError
from workbench.lock import job_id
from workbench.store import Store

#: Per-sample fields of a Capture ([N, ...] tensors in the samples' order); hidden states come besides.
PER_SAMPLE = ("loss", "accuracy", "confidence", "target_prob", "n_scored", "routing", "applied", "expert_load")


@dataclass(frozen=True)
class Plan:
    """This rank's share of the unfinished checkpoints (steps)."""

    own: list[int]  # measured by this rank alone
    shared: list[int]  # measured by all ranks together, one after the other


def plan(todo: list[int], rank: int | None = None, world: int | None = None) -> Plan:
    """Split ``todo`` (the same list on every rank) for ``rank`` of ``world``."""
    rank = distributed.rank() if rank is None else rank
    world = distributed.world_size() if world is None else world
    whole = world * (len(todo) // world)
    return Plan(own=list(todo[rank:whole:world]), shared=list(todo[whole:]) if world > 1 else [])


@contextlib.contextmanager
def writer(store: Store, *, wait: bool | float = False, job: str | None = None) -> Iterator[None]:
    """The store's writer lock for this process, or for the whole job when a process group is active: rank 0
    takes it (failing, or waiting, as a lone writer would), the other ranks join it under the job's id (the
    given one, ``$WORKBENCH_JOB_ID`` or torchrun's, else one rank 0 draws), and rank 0 removes it at the end."""
    if not distributed.active():
        with store.lock(wait=wait, job=job):
            yield
        return
    job = distributed.broadcast_object(job_id(job) or uuid.uuid4().hex)  # rank 0's: one id for the job
    lock = store.lock(wait=wait, job=job)
    distributed.on_main(lock.acquire)
    if not distributed.is_main():
        lock.acquire()  # finds rank 0's lock of the same job and joins it
    try:
        yield
    finally:
        lock.release()  # rank 0 removes the file; the caller's last collective ensures no rank writes after it


def _fields(cap: Capture) -> dict[str, torch.Tensor]:
    out = {name: getattr(cap, name) for name in PER_SAMPLE if getattr(cap, name) is not None}
    out |= {f"hidden.{layer}": h for layer, h in cap.hidden.items()}
    return out


def gather_capture(cap: Capture, chunk_rows: int = 4096) -> Capture | None:
    """Rank 0: the whole capture, each rank's rows put in place; other ranks: None. Rows travel in chunks of
    ``chunk_rows`` samples, so what is in flight stays bounded when the tensors are memory-mapped."""
    if not distributed.active() or cap.rows is None:
        return cap
    rows = cap.rows
    counts = distributed.gather_objects([len(rows)])
    chunks = max(math.ceil(c / chunk_rows) for c in counts)
    mine = _fields(cap)
    main = distributed.is_main()
    for i in range(chunks):
        part = rows[i * chunk_rows:(i + 1) * chunk_rows]
        payload = (part, {k: v[part].clone() for k, v in mine.items()}) if len(part) else None
        parts = distributed.gather_to_main(payload)
        if not main:
            continue
        for r, got in enumerate(parts[1:], start=1):
            if got is None:
                continue
            index, values = got
            for key, v in values.items():
                if key not in mine:  # rank 0 always runs the first batch, so it has every field
                    raise WorkbenchError(f"rank {r} captured {key!r}, which rank 0 did not; report this as a bug")
                mine[key][index] = v
    if not main:
        return None
    if sum(counts) != len(cap):  # every sample in exactly one rank's batches, or a number would be garbage
        raise WorkbenchError(f"the ranks captured {sum(counts)} rows of {len(cap)} samples; report this as a bug")
    return replace(cap, rows=None)


__all__ = ["Plan", "gather_capture", "plan", "writer"]
