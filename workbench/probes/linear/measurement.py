"""Linear probes at every block and checkpoint: the ``probes`` measurement.

At each checkpoint it captures the last-token hidden state after every block, and for each task fits one
probe per block on the task's ``train`` split and scores it on its ``test`` split (docs/probes.md,
"Linear probes"; Zhang, Choshen & Andreas, arXiv 2409.02228). Tasks
come from the sample groups: a group ``task:split`` belongs to ``task``; a group without ':' (the built-in
modular-addition run's ``train`` / ``test``) belongs to task ``all``. A probe's label is the answer token
of the sample (its last scored target), as a class index among the task's answers: the right option of a
two-option task, the sum of a modular-addition sample.

Rows per checkpoint, task (``group``) and block (``layer``): ``accuracy`` (test split), ``train_accuracy``,
``control_accuracy`` (a control task that labels each input *type* at random, Hewitt & Liang 2019; the
type is the input token at ``control_position``, by default the one before the last), ``selectivity``
(accuracy − control accuracy) and ``epochs`` (the iteration early stopping kept); and per task, with
``layer`` null, ``model_accuracy``: the model's own top-1 accuracy on the test split at that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import torch

from workbench.capture import Capture, CaptureSpec, default_device
from workbench.errors import InputError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, setting
from workbench.probes.linear import figures
from workbench.probes.linear.functions import fit_probes
from workbench.runs import Run, count_blocks
from workbench.samples import answer_tokens, split_group
from workbench.store import Store


@dataclass(frozen=True)
class LinearProbeAccuracy(Measurement):
    """Probe accuracy and selectivity per block, task and checkpoint (see the module docstring).

    layers: block indices (default: every block of the run's model, settled from the run).
    l2, val_fraction, max_epochs, patience, seed: passed to :func:`workbench.probes.linear.fit_probes`.
    control: fit control-task probes for selectivity. control_position: which input token is a sample's type.
    train_split, test_split: the split names in the groups. max_train: subsample the train split (seeded).
    device: where to fit (default: CUDA when present).
    """

    name = "probes"
    view = "widgets.linear:ProbeView"
    in_demo = True
    section_order = 60

    layers: tuple[int, ...] | None = None
    l2: float = 1e-3
    val_fraction: float = 0.1
    max_epochs: int = 500
    patience: int = 5
    control: bool = True
    control_position: int = -2
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = None
    seed: int = 0
    device: str | None = setting(None)

    def __post_init__(self) -> None:
        if self.layers is not None:  # frozen: a list becomes a tuple
            object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))

    def settle(self, run: Run) -> "LinearProbeAccuracy":
        """Every block of the run's model when no layers were given."""
        return self if self.layers is not None else replace(self, layers=tuple(range(count_blocks(run))))

    def spec(self) -> CaptureSpec:
        if self.layers is None:
            raise InputError("the probes measurement does not know its layers yet: give layers=, or settle it on a "
                             "run (settle(run), which workbench.measure calls)")
        return CaptureSpec(hidden_layers=self.layers, hidden_reduce="last")

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        layers = sorted(cap.hidden)
        if not layers:
            raise InputError("the capture holds no hidden states; measure with this measurement's spec()")
        samples = ctx.samples
        feats = torch.stack([cap.hidden[v] for v in layers])  # [L, N, D]
        answers = answer_tokens(samples.targets)
        pos = self.control_position
        types = torch.tensor([x[pos] if -len(x) <= pos < len(x) else x[0] for x in samples.input_ids])
        by_task: dict[str, dict[str, list[int]]] = {}
        for i, g in enumerate(samples.groups):
            task, split = split_group(g)
            by_task.setdefault(task, {}).setdefault(split, []).append(i)
        device = torch.device(self.device) if self.device is not None else default_device()
        x = feats.to(device)
        parts = []
        for task, splits in by_task.items():
            tr, te = splits.get(self.train_split), splits.get(self.test_split)
            if not tr or not te:
                continue
            if self.max_train is not None and len(tr) > self.max_train:
                g = torch.Generator().manual_seed(self.seed)
                tr = sorted(torch.tensor(tr)[torch.randperm(len(tr), generator=g)[: self.max_train]].tolist())
            tr_t, te_t = torch.tensor(tr), torch.tensor(te)
            classes, y = torch.unique(answers[torch.cat([tr_t, te_t])], return_inverse=True)
            tr_d, te_d = tr_t.to(device), te_t.to(device)
            if bool((classes < 0).any()):
                raise InputError(f"some samples of task {task!r} score no position, so they have no label to probe")
            y_tr, y_te = y[: len(tr)], y[len(tr):]
            try:
                probes = fit_probes(x[:, tr_d], y_tr, n_classes=len(classes), l2=self.l2,
                                    val_fraction=self.val_fraction, max_epochs=self.max_epochs,
                                    patience=self.patience, seed=self.seed, types=types[tr_t] if self.control else None)
            except InputError as exc:
                raise InputError(f"task {task!r} at step {ctx.step}: {exc}") from exc
            metrics = {"accuracy": probes.accuracy(x[:, te_d], y_te),
                       "train_accuracy": probes.accuracy(x[:, tr_d], y_tr), "epochs": probes.epochs.float()}
            if self.control:
                metrics["control_accuracy"] = probes.control_accuracy(x[:, te_d], types[te_t])
                metrics["selectivity"] = metrics["accuracy"] - metrics["control_accuracy"]
            for metric, v in metrics.items():
                parts.append(pl.DataFrame({"metric": metric, "group": task, "layer": layers,
                                           "value": v.double().cpu().numpy()}))
            model_acc = cap.accuracy[te_t]
            parts.append(pl.DataFrame({"metric": ["model_accuracy"], "group": [task],
                                       "value": [float(model_acc[~torch.isnan(model_acc)].mean())]}))
        if not parts:
            raise InputError(
                f"no task has both a {self.train_split!r} and a {self.test_split!r} split: name the sample groups "
                f"'task:{self.train_split}' / 'task:{self.test_split}' (or plain '{self.train_split}' / "
                f"'{self.test_split}'); the groups are {samples.group_names}"
            )
        return pl.concat(parts, how="diagonal_relaxed")

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        return figures.report_section(cls.table(store)) if cls.measured(store) else None


__all__ = ["LinearProbeAccuracy", "answer_tokens", "count_blocks"]
