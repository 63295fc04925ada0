"""The Measurement contract, its registry, and the one resumable loop over checkpoints.

A probe family is a folder ``workbench/probes/<family>/``: its pure functions, its measurement(s) and its
figures. A measurement is a frozen dataclass that subclasses :class:`Measurement`; giving the subclass a
``name`` registers it, and the CLI, :func:`measure`, the report and the Jupyter views find it by that name
(:func:`registry`), which is also the name of its table in the store::

    @dataclass(frozen=True)
    class LossSpread(Measurement):
        name = "spread"                       # table, CLI --probe name, registry key
        quantile: float = 0.9                 # an option: it changes the numbers
        device: str | None = setting(None)    # not an option: it does not

        def measure(self, cap, ctx):          # one checkpoint -> tidy rows
            ...

What a measurement says about itself:

- its **fields** are its options. Every field is recorded in the store when a measurement starts, and a resume
  under other values is refused, except fields declared with :func:`setting`: what does not change the numbers
  (device, backend, batch size, progress) or what :meth:`~Measurement.settle` reads from the run;
- :meth:`~Measurement.settle` is the one place it reads the run (how many blocks the model has, the run's own
  documents); it returns a settled copy and never changes the measurement it is called on;
- :meth:`~Measurement.spec`: what the one capture pass per checkpoint must collect, or None when it needs no
  capture (it then works on ``ctx.model``, the loaded checkpoint);
- :meth:`~Measurement.measure`: one checkpoint's table; :meth:`~Measurement.finalize`: a table across all
  checkpoints; :meth:`~Measurement.begin`: files beside them that its views need;
- :meth:`~Measurement.section`: its part of the run report; ``view``: its Jupyter view, as
  ``"widgets.<module>:<Class>"`` (``workbench`` never imports ``widgets``; :func:`widgets.view` does).

:func:`measure` settles the measurements on the run, takes the store's writer lock, records each measurement's
fingerprint (its options, ``version``, and what else changes its numbers: the samples, dtype, autocast and the
run's model), then loads each checkpoint that one of them has not finished, captures once with the union of
their specs, writes each part atomically and releases the model. Killed and started again, it resumes at the
first checkpoint without a part and ends with the same tables; started under another fingerprint, it refuses
and names the difference. A measurement whose numbers change with the code bumps its ``version``, so that old
stores are not resumed with new numbers.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import polars as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed, sharding
from workbench.capture import Capture, CaptureSpec, capture, default_device, model_positions, vocab_size
from workbench.checks import is_integer, plain
from workbench.errors import InputError
from workbench.figures import Section
from workbench.runs import Checkpoint, Run
from workbench.samples import SampleSet
from workbench.spill import parse_bytes
from workbench.store import Store

#: The folder of a store where captures beyond their memory budget keep per-sample tensors (files unlinked once
#: mapped, so it stays empty).
SPILL_DIR = ".spill"

#: Metadata key of the fields that are not options (see :func:`setting`).
NOT_AN_OPTION = "workbench.not_an_option"


def setting(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A field of a measurement that is not one of its options: it does not change the numbers (device,
    backend, batch size, progress), or :meth:`Measurement.settle` fills it from the run. It is left out of
    :meth:`Measurement.options`, so a resume may change it, and out of comparisons."""
    return field(default=default, compare=False, metadata={NOT_AN_OPTION: True}, **kwargs)


@dataclass
class StepContext:
    """What a measurement sees of one checkpoint besides its capture."""

    run: Run
    checkpoint: Checkpoint
    model: nn.Module  # the loaded checkpoint on ``device``, in eval mode; released after the step
    device: torch.device
    store: Store
    progress: bool = True
    given_samples: SampleSet | None = None

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def samples(self) -> SampleSet:
        """The samples the capture ran on: those given to :func:`measure`, else the run's."""
        return self.given_samples if self.given_samples is not None else self.run.samples


_REGISTRY: dict[str, type["Measurement"]] = {}


@dataclass(frozen=True)
class Measurement:
    """Base class of the measurements: see the module docstring for the contract."""

    #: The store table and the CLI's ``--probe`` name. A subclass that sets it registers itself.
    name: ClassVar[str]
    #: The Jupyter view, ``"widgets.<module>:<Class>"``; None when the family has none.
    view: ClassVar[str | None] = None
    #: Whether ``workbench demo`` (and ``workbench measure`` without ``--probe``) measures it.
    in_demo: ClassVar[bool] = False
    #: Where its section goes in the run report (smaller first).
    section_order: ClassVar[int] = 100
    #: Raised when its numbers change with the code: a store measured under another version is not resumed.
    version: ClassVar[int] = 1
    #: Whether its numbers depend on the capture (the samples, autocast, truncation); None: when spec() is
    #: not None. A measurement that captures on its own (spec() None) sets True.
    captures: ClassVar[bool | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # a subclass that changes behaviour but keeps its parent's table (and registration)
        old = _REGISTRY.get(cls.name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"measurement name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; "
                            f"give {cls.__module__}.{cls.__qualname__} another name")
        _REGISTRY[cls.name] = cls  # a module imported again (a notebook cell run twice) replaces its own class

    # --- what it needs -------------------------------------------------------------------------------------
    def settle(self, run: Run) -> "Measurement":
        """This measurement with every choice that depends on ``run`` made; :func:`measure` calls it once."""
        return self

    def spec(self) -> CaptureSpec | None:
        """What the capture must collect; None when the measurement works on ``ctx.model`` alone."""
        return CaptureSpec()

    def options(self) -> dict:
        """The fields that change the numbers (all but :func:`setting` fields), as stored in the store."""
        return {f.name: _option_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get(NOT_AN_OPTION)}

    # --- what it writes ------------------------------------------------------------------------------------
    def begin(self, store: Store) -> None:
        """Write files the views need beside the tables (after the options are recorded)."""

    def measure(self, cap: Capture | None, ctx: StepContext) -> pl.DataFrame:
        """One checkpoint's rows (``cap`` is None when :meth:`spec` is None)."""
        raise NotImplementedError

    def finalize(self, store: Store, run: Run) -> pl.DataFrame | None:
        """A table computed across all checkpoints, or None."""
        return None

    # --- reading back --------------------------------------------------------------------------------------
    @classmethod
    def measured(cls, store: Store) -> bool:
        return cls.name in store.probes()

    @classmethod
    def table(cls, store: Store, final: bool | None = False) -> pl.DataFrame:
        """The per-checkpoint table (``final=True``: the one across checkpoints; None: both)."""
        return store.table(cls.name, final=final)

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        """The report's section from the stored tables, or None when there is nothing to show."""
        return None


def _option_value(value):
    if isinstance(value, SampleSet):
        return value.digest()  # the samples themselves are too big for options.json; their digest is not
    if isinstance(value, (tuple, list)):
        return [_option_value(v) for v in value]
    return plain(value)  # np.float32(0.7) is recorded as 0.7, and a resume with 0.7 matches it


# --- the registry -------------------------------------------------------------------------------------------
def registry() -> dict[str, type[Measurement]]:
    """Every registered measurement by name, in report order. The families under ``workbench/probes/`` are
    found by folder and imported first, so a new family needs no line anywhere else."""
    probes = importlib.import_module("workbench.probes")  # by name: the families import this module
    for family in pkgutil.iter_modules(probes.__path__):
        if family.ispkg:
            importlib.import_module(f"{probes.__name__}.{family.name}")
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].section_order, kv[0])))


def measurement_class(name: str) -> type[Measurement]:
    known = registry()
    if name not in known:
        raise InputError(f"unknown measurement {name!r}; known: {', '.join(sorted(known))}")
    return known[name]


def demo_measurements() -> list[str]:
    """The names ``workbench demo`` measures on the built-in run."""
    return [n for n, cls in registry().items() if cls.in_demo]


# --- the one loop over checkpoints -----------------------------------------------------------------------------
def measure(
    run: Run,
    measurements: Sequence[Measurement | str],
    *,
    samples: SampleSet | None = None,
    steps: Sequence[int] | int | None = None,
    device=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    truncate: bool = False,
    wait: bool | float = False,
    job: str | None = None,
    memory_budget: int | str | None = None,
    **capture_kwargs,
) -> Store:
    """Measure every checkpoint of ``run`` (or ``steps``) into ``run.store``; returns the store.

    ``measurements`` are instances or registered names (measured with their defaults). ``samples`` replaces the
    run's samples for the capture; ``truncate`` cuts samples longer than the model's positions instead of
    refusing them; ``capture_kwargs`` go to :func:`workbench.capture`. ``overwrite`` measures again from scratch
    into a new table that replaces the old one only once complete. Another process writing the store makes this
    one fail, or with ``wait`` (True, or seconds) wait for it; ``job`` names the distributed job this process is
    a rank of (see :mod:`workbench.lock`). ``memory_budget`` (bytes, or text like ``"4GiB"``) bounds the
    per-sample tensors a capture holds in memory; past it they stream to memory-mapped files beside the store.

    Under torchrun (or any initialized process group) every rank calls it alike: the ranks take different
    unfinished checkpoints, and share the samples of the last ones when fewer remain than there are ranks
    (:mod:`workbench.sharding`); rank 0 writes the across-checkpoint tables once all are done. To measure on one
    rank alone inside such a job, call it within :func:`workbench.distributed.local`.
    """
    if not measurements:
        raise InputError("give at least one measurement (e.g. LossAccuracy(), RoutingStats())")
    ms = [(measurement_class(m)() if isinstance(m, str) else m).settle(run) for m in measurements]
    names = [m.name for m in ms]
    if len(set(names)) != len(names):
        raise InputError(f"measurement names must differ, got {names}")
    chosen = _steps(run, steps) if steps is not None else set(run.steps)
    wanted = [c for c in run.checkpoints if c.step in chosen]
    specs = [s for s in (m.spec() for m in ms) if s is not None]
    spec = CaptureSpec()
    for s in specs:
        spec = spec.union(s)
    if samples is None and any(_captures(m) for m in ms):
        samples = run.samples  # read once, and before anything is written (it raises when the run has none)
    device = distributed.local_device(torch.device(device) if device is not None else default_device())
    budget = parse_bytes(memory_budget)
    autocast = capture_kwargs.get("autocast")
    common = {"model": run.identity(), "dtype": None if dtype is None else str(dtype)}
    capturing = {"samples": samples.digest() if samples is not None else None, "truncate": bool(truncate),
                 "autocast": bool(device.type == "cuda" if autocast is None else autocast)}
    store = run.store
    fingerprints = {m.name: {"version": m.version, **common, **(capturing if _captures(m) else {})} for m in ms}
    started = distributed.init_from_env(device)  # torchrun without a process group yet: this call starts it
    try:
        with sharding.writer(store, wait=wait, job=job):
            distributed.on_main(lambda: _begin(store, ms, fingerprints, overwrite))
            if not distributed.is_main():
                for m in ms:
                    store.follow(m.name, overwrite=overwrite)  # rank 0 began it: write where it does
            todo = distributed.on_main(lambda: [c.step for c in wanted
                                                if any(not store.has(m.name, c.step) for m in ms)])
            plan = sharding.plan(todo)
            step = _Step(run, ms, spec if specs else None, samples, device, dtype, store, progress, truncate,
                         budget, capture_kwargs)
            by_step = {c.step: c for c in wanted}
            bar = tqdm(total=len(plan.own) + len(plan.shared), desc=f"measuring {run.name}", unit="ckpt",
                       disable=not progress or not distributed.is_main())
            with distributed.local():  # a checkpoint of this rank's own: no collective may wait for the others
                for s in plan.own:
                    bar.set_postfix(step=s)
                    step(by_step[s])
                    bar.update()
            for s in plan.shared:
                bar.set_postfix(step=s)
                step(by_step[s], shard=True)
                bar.update()
            bar.close()
            distributed.barrier()  # every part is written before rank 0 reads them all
            distributed.on_main(lambda: _finish(store, ms, run))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return store


def _begin(store: Store, ms: list[Measurement], fingerprints: dict, overwrite: bool) -> None:
    for m in ms:
        store.begin(m.name, m.options(), overwrite=overwrite, fingerprint=fingerprints[m.name])
        m.begin(store)


def _finish(store: Store, ms: list[Measurement], run: Run) -> None:
    for m in ms:
        final = m.finalize(store, run)
        if final is not None:
            store.write_final(m.name, final)
    for m in ms:
        store.commit(m.name)  # an overwrite's new table replaces the old one only now, complete


@dataclass
class _Step:
    """Measure one checkpoint: load it, capture once with the union of the specs, write each unfinished part.
    With ``shard``, every rank captures its share of the batches and rank 0 measures the gathered capture."""

    run: Run
    ms: list[Measurement]
    spec: CaptureSpec | None
    samples: SampleSet | None
    device: torch.device
    dtype: torch.dtype | None
    store: Store
    progress: bool
    truncate: bool
    memory_budget: int | None
    capture_kwargs: dict
    fitted: dict = field(default_factory=dict)  # samples checked against each shape of model, once

    def __call__(self, ckpt: Checkpoint, shard: bool = False) -> None:
        store, ms = self.store, self.ms
        model = ckpt.load(device=self.device, dtype=self.dtype)
        cap = ctx = None
        try:
            given = self.samples
            if self.spec is not None:  # checked against the model (vocabulary, positions) once per shape
                limits = (vocab_size(model), model_positions(model))
                if limits not in self.fitted:
                    self.fitted[limits] = self.samples.fit(*limits, truncate=self.truncate)
                given = self.fitted[limits]
                cap = capture(model, given, self.spec, device=self.device,
                              progress=self.progress and distributed.is_main(),
                              shard=(distributed.rank(), distributed.world_size()) if shard else None,
                              memory_budget=self.memory_budget, spill_dir=store.root / SPILL_DIR,
                              **self.capture_kwargs)
                if shard:
                    cap = sharding.gather_capture(cap)
            ctx = StepContext(self.run, ckpt, model, self.device, store, self.progress, given)
            todo = [m for m in ms if not store.has(m.name, ckpt.step)]
            if shard:
                # Measurements on the model alone run on every rank (influence shards its passes over them);
                # those on the capture run on rank 0, which holds it whole. Rank 0 writes.
                alone = {m.name: m.measure(None, ctx) for m in todo if m.spec() is None}
                distributed.on_main(lambda: self._measure([m for m in todo if m.name not in alone], cap, ctx,
                                                          written=alone))
            else:
                self._measure(todo, cap, ctx)
        finally:
            del model, cap, ctx
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _measure(self, todo: list[Measurement], cap, ctx: StepContext, written: dict | None = None) -> None:
        for name, df in (written or {}).items():
            self.store.write(name, ctx.step, df)
        for m in todo:
            self.store.write(m.name, ctx.step, m.measure(cap, ctx))


def _captures(m: Measurement) -> bool:
    return m.captures if m.captures is not None else m.spec() is not None


def _steps(run: Run, steps: Sequence[int] | int) -> set[int]:
    """``steps`` checked against the run's: integers, at least one, each a checkpoint of the run."""
    steps = [steps] if is_integer(steps) else list(steps)
    if not steps:
        raise InputError(f"steps is empty, so nothing would be measured; give some of the run's steps {run.steps}, "
                         "or steps=None for all")
    bad = [s for s in steps if not is_integer(s)]
    if bad:
        raise InputError(f"steps are checkpoint steps (integers), not {bad}; the run's steps are {run.steps}")
    missing = sorted({plain(s) for s in steps} - set(run.steps))
    if missing:
        raise InputError(f"run {run.name!r} has no checkpoints at steps {missing}; its steps are {run.steps}")
    return {plain(s) for s in steps}


__all__ = ["Measurement", "StepContext", "demo_measurements", "measure", "measurement_class", "registry",
           "setting"]
