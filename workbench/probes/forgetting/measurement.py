"""The ``forgetting`` measurement: two-option accuracy and confidence of every group of a forgetting run.

Per checkpoint and group: ``option_accuracy`` (the right option has the highest probability among the
options), ``confidence`` (right against distractor, :func:`~workbench.probes.forgetting.relative_confidence`),
and on the forget group ``fit_random_labels`` (accuracy against the labels trained on); at the run's first
checkpoint, ``variability`` per group (:func:`~workbench.probes.forgetting.representation_variability` of the
last-token hidden state at ``variability_layer``).

Its options are the forgetting protocol the run was made with (``run.info["forgetting"]``), settled from the
run, so the store records how the forgetting was done; the answer options and trained labels come from the
run's ``choices.parquet`` and ``forget_set.parquet``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import torch
from torch import nn

from workbench.capture import CaptureSpec, capture
from workbench.errors import InputError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, setting
from workbench.probes.forgetting import figures
from workbench.probes.forgetting.functions import relative_confidence, representation_variability
from workbench.probes.forgetting.tasks import load_choices, scored_position
from workbench.runs import Run
from workbench.samples import IGNORE, SampleSet
from workbench.store import Store


def option_probs(model: nn.Module, samples: SampleSet, options: torch.Tensor, *, hidden_layers: Sequence[int] = (),
                 device=None, **capture_kwargs):
    """Probability of each option at each sample's scored position, [samples, k] (0 where options are padded
    with -1), and the capture of the samples (with hidden states at ``hidden_layers``).

    One capture pass over k copies of the samples, each with another option as target: the core capture's
    ``target_prob`` is then each option's probability.
    """
    k = options.shape[1]
    pos = [scored_position(t, i) for t, i in zip(samples.targets, samples.ids)]
    ids, groups, inputs, targets = [], [], [], []
    for j in range(k):
        for i in range(len(samples)):
            tok = int(options[i, j])
            t = [IGNORE] * len(samples.targets[i])
            t[pos[i]] = max(tok, 0)
            ids.append(f"{samples.ids[i]}#{j}")
            groups.append(samples.groups[i])
            inputs.append(samples.input_ids[i])
            targets.append(t)
    copies = SampleSet(ids=ids, groups=groups, input_ids=inputs, targets=targets)
    cap = capture(model, copies, CaptureSpec(hidden_layers=tuple(hidden_layers), hidden_reduce="last"), device=device,
                  **capture_kwargs)
    n = len(samples)
    probs = cap.target_prob.view(k, n).t().double()
    probs = torch.where(options >= 0, probs, torch.zeros_like(probs))
    hidden = {layer: h[:n] for layer, h in cap.hidden.items()}
    return probs, hidden


def choice_metrics(probs: torch.Tensor, labels: torch.Tensor, groups: Sequence[str]) -> pl.DataFrame:
    """Per group: two-option accuracy (the right option has the highest probability among the options) and
    mean relative confidence, as tidy rows."""
    labels = torch.as_tensor(labels).long()
    right = probs.gather(1, labels[:, None])[:, 0]
    other = probs.scatter(1, labels[:, None], -1.0).amax(1)
    correct = (right > other).double()
    conf = relative_confidence(probs, labels)
    df = pl.DataFrame({"group": list(groups), "option_accuracy": correct.numpy(), "confidence": conf.numpy()})
    return df.group_by("group", maintain_order=True).agg(pl.all().mean()).unpivot(
        index="group", variable_name="metric", value_name="value")


@dataclass(frozen=True)
class Forgetting(Measurement):
    """Two-option accuracy and confidence per group over a forgetting run's checkpoints (see the module
    docstring). Every option is settled from the run's protocol when left None; one given explicitly must
    match it."""

    name = "forgetting"
    section_order = 70
    captures = True  # its own capture per option (option_probs): its numbers depend on the samples

    task: str | None = None
    n: int | None = None
    labels: str | None = None
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    seed: int | None = None
    eval_tasks: tuple[str, ...] | None = None
    variability_layer: int | None = None
    max_eval: int | None = None
    # settled from the run's files
    choices: torch.Tensor | None = setting(None)  # [samples, k] option tokens, -1 where a sample has fewer
    trained: torch.Tensor | None = setting(None)  # [samples] label trained on (option index), -1 off the forget set

    def settle(self, run: Run) -> "Forgetting":
        protocol = run.info.get("forgetting")
        if protocol is None:
            raise InputError(f"run {run.name!r} is not a forgetting run (made by workbench.probes.forgetting.forget)")
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in protocol}
        for key, value in given.items():
            stored = tuple(protocol[key]) if key == "eval_tasks" else protocol[key]
            if value is not None and value != stored:
                raise InputError(f"run {run.name!r} was made with {key}={stored!r}, not {value!r}")
        samples = run.samples
        options = load_choices(run)
        width = max(len(o) for o in options.values())
        choices = torch.tensor([options[i] + [-1] * (width - len(options[i])) for i in samples.ids])
        labels = dict(pl.read_parquet(run.folder / "forget_set.parquet").select("sample_id", "label").iter_rows())
        forget_group = f"{protocol['task']}:forget"
        trained = torch.tensor([labels[i] if g == forget_group else -1 for i, g in zip(samples.ids, samples.groups)])
        settled = {k: tuple(v) if k == "eval_tasks" else v for k, v in protocol.items() if k in given}
        return dataclasses.replace(self, **settled, choices=choices, trained=trained)

    def spec(self) -> None:
        return None  # one capture pass per option, of its own: see option_probs

    def measure(self, cap: None, ctx: StepContext) -> pl.DataFrame:
        if self.choices is None:
            raise InputError("the forgetting measurement reads its run's files: settle it on the run first "
                             "(workbench.measure does)")
        samples = ctx.samples
        first = ctx.step == ctx.run.steps[0]
        layers = (self.variability_layer,) if first else ()
        probs, hidden = option_probs(ctx.model, samples, self.choices, hidden_layers=layers, device=ctx.device,
                                     progress=ctx.progress)
        answers = torch.tensor([t[scored_position(t, i)] for t, i in zip(samples.targets, samples.ids)])
        right = (self.choices == answers[:, None]).long().argmax(1)
        rows = [choice_metrics(probs, right, samples.groups)]
        is_forget = self.trained >= 0
        pf = probs[is_forget]
        fit = (pf.gather(1, self.trained[is_forget][:, None])[:, 0] >= pf.amax(1)).double().mean()
        rows.append(pl.DataFrame({"group": [f"{self.task}:forget"], "metric": ["fit_random_labels"],
                                  "value": [float(fit)]}))
        for layer, h in hidden.items():
            for g in samples.group_names:
                idx = [i for i, x in enumerate(samples.groups) if x == g]
                if len(idx) >= 2:
                    rows.append(pl.DataFrame({"group": [g], "metric": ["variability"], "layer": [layer],
                                              "value": [representation_variability(h[idx])]}))
        return pl.concat(rows, how="diagonal_relaxed")

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        return figures.report_section(cls.table(store), store.options(cls.name) or {})


__all__ = ["Forgetting", "choice_metrics", "option_probs"]
