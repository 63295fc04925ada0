"""The ``coherence`` measurement: gradient coherence of each sample group at every checkpoint.

At each measured checkpoint (``steps``; default at most ``max_checkpoints`` spread over the run: the backward
passes are the cost; the others get an empty part), for every measured set (each sample group with its true labels, and a random-label copy of
the ``control_groups``, extra column ``labels`` = ``"true"`` / ``"random"``) it runs one backward pass per
batch (:func:`~workbench.probes.coherence.passes.gradient_sums`) and writes:

- overall (``layer`` and ``module`` null): ``alpha``, ``m_coherence``, ``n`` (m, the examples in the set),
  ``mean_norm_sq`` (E‖g‖²), ``loss`` and ``accuracy`` (the set's means under its labels);
- per block (``layer`` = block index, ``module`` null): ``alpha``, ``m_coherence``, ``mean_norm_sq``;
- per tracked unit (``module`` = the weight matrix, or the stack of a layer's experts' matrices; ``layer``
  its block, null outside the blocks): ``alpha``, ``m_coherence``;
- for the overall group ``all`` (every true-label set together) the overall and per-block rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import polars as pl
import torch

from workbench.errors import InputError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, setting
from workbench.probes.coherence import figures
from workbench.probes.coherence.functions import GradientSums, random_labels
from workbench.probes.coherence.passes import MODULES, gradient_sums, scored_samples, tracked_modules, unit_layers
from workbench.runs import Run, spread_steps
from workbench.samples import OVERALL, SampleSet
from workbench.store import Store

LABELS = ("true", "random")
SCHEMA = {"group": pl.String, "labels": pl.String, "metric": pl.String, "layer": pl.Int32, "module": pl.String,
          "value": pl.Float64}


@dataclass(frozen=True)
class GradientCoherence(Measurement):
    """Coherence of per-example gradients per group, block and tracked matrix (docs/probes.md, "Gradient
    coherence"; Chatterjee & Zielinski, arXiv 2203.10036).

    groups: the sample groups measured (default: every group of the samples).
    control_groups: groups measured a second time with random labels, the control (default: ``train`` when
        there is such a group, else every measured group); ``()`` for none.
    max_samples: at most this many samples per group (a seeded subset, the same at every checkpoint; None:
        all). m-coherence ranges from 1 to m, so compare sets of similar size.
    steps: the checkpoints measured (default: at most ``max_checkpoints``, None for all, spread evenly over the
        run's checkpoints, the first and the last included).
    modules: ``"all"`` (every linear layer, MoE experts and routers) or ``"mlp"`` (the MLPs only).
    seed: draws the subsets and the random labels.
    token_budget, max_batch: batch sizes (padded tokens, samples); they do not change the numbers.
    """

    name = "coherence"
    view = "widgets.coherence:CoherenceView"
    in_demo = True
    section_order = 70

    groups: tuple[str, ...] | None = None
    control_groups: tuple[str, ...] | None = None
    max_samples: int | None = 256
    steps: tuple[int, ...] | None = None
    max_checkpoints: int | None = 20
    modules: str = "all"
    seed: int = 0
    token_budget: int = setting(8192)
    max_batch: int = setting(512)

    def __post_init__(self) -> None:
        for name in ("groups", "control_groups", "steps"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) if name == "steps" else v for v in value))
        if self.modules not in MODULES:
            raise InputError(f"modules must be one of {MODULES}, not {self.modules!r}")
        if self.max_samples is not None and self.max_samples < 2:
            raise InputError("max_samples must be at least 2 (or None): coherence compares examples")

    def settle(self, run: Run) -> "GradientCoherence":
        if self.steps is not None:
            missing = sorted(set(self.steps) - set(run.steps))
            if missing:
                raise InputError(f"steps {missing} are not checkpoints of the run; its steps are {run.steps}")
            return self
        if self.max_checkpoints is None:
            return replace(self, steps=tuple(run.steps))
        return replace(self, steps=spread_steps(run.steps, self.max_checkpoints))

    def spec(self) -> None:
        return None  # works on the model: one backward pass per batch, no capture

    # --- the sets ----------------------------------------------------------------------------------------------
    def sets(self, samples: SampleSet) -> list[tuple[str, str, SampleSet]]:
        """(group, labels, samples) of every measured set, in order; the same at every checkpoint."""
        names = samples.group_names
        groups = list(self.groups) if self.groups is not None else names
        control = (list(self.control_groups) if self.control_groups is not None
                   else ["train"] if "train" in groups else groups)
        missing = sorted(set(groups + control) - set(names))
        if missing:
            raise InputError(f"the samples have no group(s) {missing}; their groups are {names}")
        keep = scored_samples(samples)
        if len(keep) < len(samples):
            warnings.warn(f"{len(samples) - len(keep)} samples score no position and are left out of coherence",
                          stacklevel=3)
            samples = samples.select(keep)
        out = []
        for i, g in enumerate(groups):
            idx = [j for j, gg in enumerate(samples.groups) if gg == g]
            if len(idx) < 2:
                raise InputError(f"group {g!r} has {len(idx)} scored sample(s); coherence needs at least 2")
            if self.max_samples is not None and len(idx) > self.max_samples:
                gen = torch.Generator().manual_seed(self.seed + i)
                idx = sorted(torch.tensor(idx)[torch.randperm(len(idx), generator=gen)[: self.max_samples]].tolist())
            subset = samples.select(idx)
            out.append((g, "true", subset))
            if g in control:
                out.append((g, "random", random_labels(subset, seed=self.seed + 1000 + i)))
        return out

    # --- one checkpoint ------------------------------------------------------------------------------------------
    def measure(self, cap, ctx: StepContext) -> pl.DataFrame:
        if self.steps is not None and ctx.step not in self.steps:
            return pl.DataFrame(schema=SCHEMA)  # not one of the checkpoints measured: an empty part
        model = ctx.model
        tracked = tracked_modules(model, self.modules)
        layer_of = unit_layers(model, tracked)
        rows: list[dict] = []
        true_sums: list[GradientSums] = []
        for g, labels, subset in self.sets(ctx.samples):
            sums, loss, acc = gradient_sums(model, subset, tracked, device=ctx.device, token_budget=self.token_budget,
                                            max_batch=self.max_batch, progress=ctx.progress,
                                            desc=f"coherence {g} ({labels} labels)")
            rows += self.set_rows(sums, layer_of, g, labels, units=True)
            rows += [{"group": g, "labels": labels, "metric": "loss", "value": float(loss.double().mean())},
                     {"group": g, "labels": labels, "metric": "accuracy", "value": float(acc.double().mean())}]
            if labels == "true":
                true_sums.append(sums)
        if len(true_sums) > 1:
            union = true_sums[0]
            for s in true_sums[1:]:
                union = union.merge(s)
            rows += self.set_rows(union, layer_of, OVERALL, "true", units=False)
        return pl.DataFrame(rows, schema=SCHEMA)

    @staticmethod
    def set_rows(sums: GradientSums, layer_of: dict[str, int | None], group: str, labels: str,
                 units: bool) -> list[dict]:
        """The rows of one set: overall, per block, and (``units``) per tracked unit."""
        base = {"group": group, "labels": labels}
        ran = [k for k in layer_of if k in sums.grad]  # units that saw no row of the set have no gradient
        alpha, m_coh = sums.coherence(ran)
        rows = [base | {"metric": "alpha", "value": alpha}, base | {"metric": "m_coherence", "value": m_coh},
                base | {"metric": "n", "value": float(sums.n)},
                base | {"metric": "mean_norm_sq", "value": sums.mean_norm_sq(ran)}]
        for layer in sorted({v for v in layer_of.values() if v is not None}):
            keys = [k for k in ran if layer_of[k] == layer]
            if not keys:
                continue
            alpha, m_coh = sums.coherence(keys)
            rows += [base | {"layer": layer, "metric": "alpha", "value": alpha},
                     base | {"layer": layer, "metric": "m_coherence", "value": m_coh},
                     base | {"layer": layer, "metric": "mean_norm_sq", "value": sums.mean_norm_sq(keys)}]
        if units:
            for key in ran:
                alpha, m_coh = sums.coherence([key])
                rows += [base | {"layer": layer_of[key], "module": key, "metric": "alpha", "value": alpha},
                         base | {"layer": layer_of[key], "module": key, "metric": "m_coherence", "value": m_coh}]
        return [r | {"value": r["value"] if r["value"] is not None else math.nan} for r in rows]

    # --- reading back --------------------------------------------------------------------------------------------
    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        return figures.report_section(cls.table(store)) if cls.measured(store) else None


__all__ = ["GradientCoherence", "LABELS"]
