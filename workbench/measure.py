"""Running measurements over a Run into its store: one capture pass per checkpoint, resumable.

A :class:`Measurement` says what it needs from the capture (:class:`CaptureSpec`), turns one checkpoint's
capture into a tidy table, and may compute something across all checkpoints at the end (``finalize``).
:func:`measure` loads each checkpoint that some measurement has not finished, captures once with the union
of their specs, writes each measurement's part atomically, and releases the model. Killed and started
again, it resumes at the first checkpoint without a part and ends with the same tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm

from workbench.capture import Capture, CaptureSpec, capture
from workbench.errors import InputError
from workbench.runs import Checkpoint, Run
from workbench.samples import SampleSet
from workbench.store import Store


@dataclass
class StepContext:
    run: Run
    checkpoint: Checkpoint
    samples: SampleSet

    @property
    def step(self) -> int:
        return self.checkpoint.step


class Measurement:
    """Base class of the drivers that turn captures into store tables."""

    name: str = "measurement"

    def prepare(self, run: Run) -> None:
        """Called by :func:`measure` before options and specs are read: a measurement whose spec depends on
        the run (such as its number of blocks) settles it here."""

    def spec(self) -> CaptureSpec:
        return CaptureSpec()

    def options(self) -> dict:
        """Everything that changes the numbers; a resume under other options is refused."""
        return {}

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        raise NotImplementedError

    def finalize(self, store: Store, run: Run) -> pl.DataFrame | None:
        """A table computed across all checkpoints, or None."""
        return None


def measure(
    run: Run,
    measurements: Sequence[Measurement],
    *,
    samples: SampleSet | None = None,
    steps: Sequence[int] | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **capture_kwargs,
) -> Store:
    """Measure every checkpoint of ``run`` (or ``steps``) into ``run.store``; returns the store."""
    if not measurements:
        raise InputError("give at least one measurement (e.g. LossAccuracy(), RoutingStats())")
    names = [m.name for m in measurements]
    if len(set(names)) != len(names):
        raise InputError(f"measurement names must differ, got {names}")
    samples = samples if samples is not None else run.samples
    store = run.store
    for m in measurements:
        m.prepare(run)
        store.begin(m.name, m.options(), overwrite=overwrite)
    spec = CaptureSpec()
    for m in measurements:
        spec = spec.union(m.spec())
    wanted = [c for c in run.checkpoints if steps is None or c.step in steps]
    todo = [c for c in wanted if any(not store.has(m.name, c.step) for m in measurements)]
    bar = tqdm(todo, desc=f"measuring {run.name}", unit="ckpt", disable=not progress)
    for ckpt in bar:
        bar.set_postfix(step=ckpt.step)
        model = ckpt.load(dtype=dtype)
        try:
            cap = capture(model, samples, spec, device=device, **capture_kwargs)
        finally:
            del model
        ctx = StepContext(run=run, checkpoint=ckpt, samples=samples)
        for m in measurements:
            if not store.has(m.name, ckpt.step):
                store.write(m.name, ckpt.step, m.measure(cap, ctx))
        del cap
    for m in measurements:
        final = m.finalize(store, run)
        if final is not None:
            store.write_final(m.name, final)
    return store
