"""Forgetting by fine-tuning on random labels (SPEC section 3; Zhang, Choshen & Andreas, arXiv 2409.02228).

The protocol: a model fine-tuned on a task with answer options (two in the study, chance 0.5) is
fine-tuned again on ``n`` of the task's training inputs (1000 in the study) whose labels are drawn uniformly
from the options (or flipped to a wrong option), with lr 1e-4. :func:`forget` runs it and saves the
forgetting as a :class:`workbench.Run` of checkpoints (step 0 is the model before forgetting), so every probe
of the workbench applies to it; at each checkpoint it also records the two-option accuracy and confidence of
every evaluation group in the run's store (probe ``forgetting``).

Measures (pure functions): :func:`forget_gap` (accuracy − chance), :func:`forget_ratio`
((acc_ft − acc_forget) / (acc_ft − chance); with flipped labels complete forgetting is accuracy 0, not
chance), :func:`forget_matrix` (forget task A, measure task B). Predictors of the ratio: initial confidence
in the right answer against the distractor (:func:`relative_confidence`) and representation variability,
the trace of the covariance of the last-token hidden state at a layer (:func:`representation_variability`,
fifth-to-last layer in the study), with :func:`correlation` across tasks.

Tables over forgetting runs: :func:`forgetting_results` (one row per forgotten task × measured task × split)
and :func:`predictor_table`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.capture import CaptureSpec, capture, default_device
from workbench.errors import InputError
from workbench.runs import Checkpoint, Run
from workbench.samples import IGNORE, SampleSet
from workbench.store import Store, write_parquet_atomic

LABEL_MODES = ("random", "flipped")
PROBE = "forgetting"

# --- pure measures ---------------------------------------------------------------------------------------------


def _acc(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if bool(torch.isnan(t).any()) or bool(((t < 0) | (t > 1)).any()):
        raise InputError(f"{name} must be accuracies in [0, 1]; got {x}")
    return t


def _out(t: torch.Tensor, like) -> float | torch.Tensor:
    return float(t) if t.dim() == 0 and not isinstance(like, torch.Tensor) else t


def forget_gap(acc, chance: float = 0.5):
    """How far above chance an accuracy still is: ``acc − chance`` (0: forgotten, to chance)."""
    return _out(_acc(acc, "acc") - chance, acc)


def forget_ratio(acc_ft, acc_forget, chance: float = 0.5, flipped: bool = False):
    """Share of the fine-tuned model's margin over chance that forgetting removed:
    ``(acc_ft − acc_forget) / (acc_ft − chance)``. 1: down to chance; 0: nothing forgotten; above 1: below
    chance. With ``flipped=True`` (training on flipped labels) complete forgetting means learning the
    flipped labels, accuracy 0, so the floor is 0 instead of chance: 1 is every answer flipped, 0.5 chance.

    Elementwise on tensors; NaN where ``acc_ft`` equals the floor (nothing to forget).
    """
    ft, fo = _acc(acc_ft, "acc_ft"), _acc(acc_forget, "acc_forget")
    floor = 0.0 if flipped else chance
    denom = ft - floor
    ratio = torch.where(denom.abs() > 1e-12, (ft - fo) / torch.where(denom.abs() > 1e-12, denom, 1.0), float("nan"))
    return _out(ratio, acc_ft if isinstance(acc_ft, torch.Tensor) else acc_forget)


def forget_matrix(acc_ft, acc_after, chance: float = 0.5, flipped: bool = False) -> torch.Tensor:
    """The task × task matrix: ``M[a, b]`` is the forget ratio on task b after forgetting task a.

    acc_ft: [T] accuracy of the fine-tuned model on each task; acc_after: [T, T], row a = accuracies on
    every task after forgetting task a.
    """
    ft, after = _acc(acc_ft, "acc_ft"), _acc(acc_after, "acc_after")
    if ft.dim() != 1 or after.shape != (ft.shape[0], ft.shape[0]):
        raise InputError(f"acc_ft must be [T] and acc_after [T, T]; got {tuple(ft.shape)} and {tuple(after.shape)}")
    return forget_ratio(ft[None, :].expand_as(after), after, chance=chance, flipped=flipped)


def relative_confidence(option_probs, labels) -> torch.Tensor:
    """Confidence in the right answer against the distractor(s): p(right) / Σ p(options), per sample."""
    p = torch.as_tensor(option_probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    if p.dim() != 2 or y.shape != (p.shape[0],):
        raise InputError(
            f"option_probs must be [samples, options] and labels [samples]; got {tuple(p.shape)}, {tuple(y.shape)}"
        )
    if bool(((y < 0) | (y >= p.shape[1])).any()):
        raise InputError(f"labels must index the {p.shape[1]} options (0..{p.shape[1] - 1})")
    return p.gather(1, y[:, None])[:, 0] / p.sum(1).clamp_min(1e-300)


def representation_variability(hidden) -> float:
    """Trace of the covariance of hidden states [samples, dim] (the sum of per-dimension variances)."""
    h = torch.as_tensor(hidden, dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] < 2:
        raise InputError(f"hidden must be [samples, dim] with at least 2 samples; got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise InputError("hidden holds NaN or infinite values; capture again in float32")
    return float(h.var(0, unbiased=True).sum())


def correlation(x, y, method: str = "spearman") -> tuple[float, float]:
    """Correlation of a predictor with the forget ratio across tasks: (coefficient, two-sided p-value)."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"x and y must be 1-D of the same length; got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 3:
        raise InputError(f"a correlation needs at least 3 tasks with values; got {int(keep.sum())}")
    if method == "spearman":
        r = stats.spearmanr(a[keep], b[keep])
    elif method == "pearson":
        r = stats.pearsonr(a[keep], b[keep])
    else:
        raise InputError(f"method must be 'spearman' or 'pearson', not {method!r}")
    return float(r.statistic), float(r.pvalue)


# --- tasks with answer options ---------------------------------------------------------------------------------


def _scored_position(targets: list[int], sample_id: str) -> int:
    pos = [i for i, t in enumerate(targets) if t != IGNORE]
    if len(pos) != 1:
        raise InputError(
            f"sample {sample_id!r} scores {len(pos)} positions; a choice task needs single-token answers (exactly "
            "one scored position holding the right option's token)"
        )
    return pos[0]


@dataclass
class ChoiceTask:
    """A task answered by choosing one of a few single-token options.

    ``samples``: groups are the splits (``train``, ``test``, ...); each sample scores exactly one position,
    whose target is the right option's token. ``options``: [samples, k] token ids of each sample's options.
    """

    name: str
    samples: SampleSet
    options: torch.Tensor

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name or "/" in self.name:
            raise InputError(f"a task name must be non-empty without ':' or '/'; got {self.name!r}")
        self.options = torch.as_tensor(self.options).long()
        n = len(self.samples)
        if self.options.dim() != 2 or self.options.shape[0] != n or self.options.shape[1] < 2:
            raise InputError(f"options must be [samples, k >= 2] for {n} samples; got {tuple(self.options.shape)}")
        self.positions = [_scored_position(t, i) for t, i in zip(self.samples.targets, self.samples.ids)]
        right = torch.tensor([t[p] for t, p in zip(self.samples.targets, self.positions)])
        hit = self.options == right[:, None]
        bad = (hit.sum(1) != 1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise InputError(
                f"sample {self.samples.ids[i]!r} of task {self.name!r}: its answer token {int(right[i])} must be "
                f"exactly one of its options {self.options[i].tolist()}"
            )
        self.labels = hit.long().argmax(1)

    def __len__(self) -> int:
        return len(self.samples)

    def select(self, indices: Sequence[int]) -> "ChoiceTask":
        idx = list(indices)
        return ChoiceTask(self.name, self.samples.select(idx), self.options[torch.as_tensor(idx, dtype=torch.long)])

    def split(self, group: str) -> "ChoiceTask":
        return self.select(self.samples.indices(group))

    def relabeled(self, labels) -> SampleSet:
        """The samples with the option ``labels[i]`` as answer (for fine-tuning on random or flipped labels)."""
        labels = torch.as_tensor(labels).long()
        targets = []
        for t, p, row, lab in zip(self.samples.targets, self.positions, self.options.tolist(), labels.tolist()):
            t = list(t)
            t[p] = row[lab]
            targets.append(t)
        s = self.samples
        return SampleSet(ids=list(s.ids), groups=list(s.groups), input_ids=list(s.input_ids), targets=targets)

    def prefixed(self, split: str | None = None) -> tuple[SampleSet, torch.Tensor]:
        """The samples (of one split, or all) with ids ``task/id`` and groups ``task:split``, and their options,
        ready to be combined with other tasks' in one run."""
        t = self.split(split) if split is not None else self
        s = t.samples
        return (
            SampleSet(ids=[f"{self.name}/{i}" for i in s.ids], groups=[f"{self.name}:{g}" for g in s.groups],
                      input_ids=list(s.input_ids), targets=list(s.targets)),
            t.options,
        )


def combine(parts: Sequence[tuple[SampleSet, torch.Tensor]]) -> tuple[SampleSet, torch.Tensor]:
    """Concatenate (samples, options) pairs (options padded with -1 to the widest)."""
    k = max(o.shape[1] for _, o in parts)
    ids, groups, inputs, targets, opts = [], [], [], [], []
    for s, o in parts:
        ids += s.ids
        groups += s.groups
        inputs += s.input_ids
        targets += s.targets
        opts.append(F.pad(o, (0, k - o.shape[1]), value=-1))
    return SampleSet(ids=ids, groups=groups, input_ids=inputs, targets=targets), torch.cat(opts)


def split_group(group: str) -> tuple[str, str]:
    """``"task:split"`` → (task, split); a group without ':' is split ``group`` of task ``"all"``."""
    task, sep, split = group.rpartition(":")
    return (task, split) if sep else ("all", group)


def save_choices(folder: str | os.PathLike, samples: SampleSet, options: torch.Tensor) -> None:
    df = pl.DataFrame({"sample_id": samples.ids, "options": options.tolist()},
                      schema={"sample_id": pl.String, "options": pl.List(pl.Int64)})
    write_parquet_atomic(df, Path(folder) / "choices.parquet")


def load_choices(run: Run) -> dict[str, list[int]]:
    """sample id → its answer options (without padding), from a run folder's ``choices.parquet``."""
    f = run.root / "choices.parquet"
    if not f.exists():
        raise InputError(f"run {run.name!r} has no choices.parquet; it was not made by forget() or toys.tasks")
    df = pl.read_parquet(f)
    return {i: [o for o in opts if o >= 0] for i, opts in zip(df["sample_id"], df["options"])}


def tasks_from_run(run: Run) -> dict[str, ChoiceTask]:
    """The choice tasks of a run (groups ``task:split``), from its samples and ``choices.parquet``."""
    choices = load_choices(run)
    s = run.samples
    out = {}
    by_task: dict[str, list[int]] = {}
    for i, g in enumerate(s.groups):
        by_task.setdefault(split_group(g)[0], []).append(i)
    for task, idx in by_task.items():
        sub = s.select(idx)
        local = SampleSet(ids=[i.split("/", 1)[-1] for i in sub.ids], groups=[split_group(g)[1] for g in sub.groups],
                          input_ids=sub.input_ids, targets=sub.targets)
        out[task] = ChoiceTask(task, local, torch.tensor([choices[i] for i in sub.ids]))
    return out


# --- scoring a model on choice tasks ---------------------------------------------------------------------------


def option_probs(model: nn.Module, samples: SampleSet, options: torch.Tensor, *, hidden_layers: Sequence[int] = (),
                 device=None, **capture_kwargs):
    """Probability of each option at each sample's scored position, [samples, k] (0 where options are padded
    with -1), and the capture of the samples (with hidden states at ``hidden_layers``).

    One capture pass over k copies of the samples, each with another option as target: the core capture's
    ``target_prob`` is then each option's probability.
    """
    k = options.shape[1]
    pos = [_scored_position(t, i) for t, i in zip(samples.targets, samples.ids)]
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


# --- the protocol --------------------------------------------------------------------------------------------


def _load_source(source) -> nn.Module:
    if isinstance(source, Run):
        source = source.checkpoints[-1]
    if isinstance(source, Checkpoint):
        return source.load()
    if isinstance(source, nn.Module):
        return copy.deepcopy(source)  # the caller's model stays as it was
    raise InputError(
        f"forget() takes a model, a Checkpoint or a Run (its last checkpoint); got {type(source).__name__}"
    )


def _saver(model: nn.Module, build):
    """How to save a checkpoint so that Run.from_folder / from_state_dicts reads it, and the run.json to write."""
    from workbench.models.toy import ToyMoETransformer

    if isinstance(model, ToyMoETransformer):
        from safetensors.torch import save_file

        def save(folder: Path, step: int, meta: dict) -> None:
            d = folder / f"step_{step:06d}"
            d.mkdir()
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, d / "model.safetensors", metadata={"format": "pt"})
            (d / "meta.json").write_text(json.dumps(meta, indent=1))

        return "builtin", save
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        def save(folder: Path, step: int, meta: dict) -> None:
            d = folder / f"step_{step:06d}"
            model.save_pretrained(d)
            (d / "meta.json").write_text(json.dumps(meta, indent=1))

        return "hf", save
    if build is None:
        raise InputError(
            f"forget() cannot save a {type(model).__name__} so that a Run reloads it: pass build= (a function "
            "returning an empty model of the same shape, as for Run.from_state_dicts)"
        )
    from safetensors.torch import save_file

    def save(folder: Path, step: int, meta: dict) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / f"step_{step:06d}.safetensors", metadata={"format": "pt"})

    return "state_dict", save


def _eval_set(task: ChoiceTask, eval_tasks: Sequence[ChoiceTask], forget_idx: list[int], forget_split: str,
              test_split: str, max_eval: int, gen: torch.Generator) -> tuple[SampleSet, torch.Tensor]:
    """The samples a forgetting run is measured on: the forget set (true answers), then ``train`` (without the
    forget set) and ``test`` of the task and of each eval task, at most ``max_eval`` of each."""
    fset = task.split(forget_split).select(forget_idx)
    s = fset.samples
    as_forget = SampleSet(ids=s.ids, groups=["forget"] * len(s), input_ids=s.input_ids, targets=s.targets)
    parts = [ChoiceTask(task.name, as_forget, fset.options).prefixed()]
    taken = set(forget_idx)
    for t in [task, *eval_tasks]:
        for split in (forget_split, test_split):
            if split not in t.samples.group_names:
                raise InputError(f"task {t.name!r} has no {split!r} split; its groups are {t.samples.group_names}")
            sub = t.split(split)
            keep = [i for i in range(len(sub)) if not (t is task and split == forget_split and i in taken)]
            if len(keep) > max_eval:
                pick = torch.randperm(len(keep), generator=gen)[:max_eval].sort().values.tolist()
                keep = [keep[i] for i in pick]
            if keep:
                parts.append(sub.select(keep).prefixed())
    return combine(parts)


def forget(
    source,
    task: ChoiceTask,
    out_dir: str | os.PathLike,
    *,
    n: int = 1000,
    labels: str = "random",
    lr: float = 1e-4,
    epochs: int = 5,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    n_checkpoints: int = 8,
    eval_tasks: Sequence[ChoiceTask] = (),
    forget_split: str = "train",
    test_split: str = "test",
    max_eval: int = 1000,
    variability_layer: int = -5,
    seed: int = 0,
    device=None,
    build=None,
    name: str | None = None,
    progress: bool = True,
) -> Run:
    """Fine-tune ``source`` on ``n`` inputs of ``task``'s ``forget_split`` with random (or flipped) labels,
    and save the forgetting as a Run in ``out_dir``.

    source: a model (copied; the original is left alone), a Checkpoint, or a Run (its last checkpoint).
    labels: ``"random"`` (uniform over each sample's options, drawn once, as in the study) or ``"flipped"``
        (a wrong option).
    lr, n: the study's 1e-4 and 1000. epochs, batch_size, weight_decay: not fixed by the study; Adam(W).
    n_checkpoints: checkpoints evenly spaced over the optimizer steps; step 0 is the model before forgetting.
    eval_tasks: other tasks measured at every checkpoint too (the task × task matrix).
    max_eval: most samples per evaluation group (``task:train`` without the forget set, ``task:test``).
    variability_layer: block whose last-token hidden state gives the representation variability at step 0.
    build: for models that are neither built-in nor Hugging Face ones, a function returning an empty model.

    The run's samples have groups ``task:forget`` (the forget inputs with their true answers), ``task:train``
    and ``task:test`` for the forgotten task and each eval task; ``choices.parquet`` holds their options and
    ``forget_set.parquet`` the labels trained on. The store holds probe ``forgetting``: per checkpoint and
    group, ``option_accuracy``, ``confidence`` (right vs. distractor) and on the forget group
    ``fit_random_labels`` (accuracy against the labels trained on); at step 0 ``variability`` per group.
    """
    if labels not in LABEL_MODES:
        raise InputError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if n < 1 or epochs < 1 or batch_size < 1 or n_checkpoints < 2:
        raise InputError("n, epochs and batch_size must be at least 1, n_checkpoints at least 2")
    if lr <= 0:
        raise InputError(f"lr must be positive, not {lr}")
    if forget_split not in task.samples.group_names:
        raise InputError(f"task {task.name!r} has no {forget_split!r} split; its groups are {task.samples.group_names}")
    pool = task.split(forget_split)
    if len(pool) < n:
        raise InputError(f"task {task.name!r} has {len(pool)} {forget_split!r} inputs, fewer than n={n}; lower n")
    names = [t.name for t in [task, *eval_tasks]]
    if len(set(names)) != len(names):
        raise InputError(f"task names must differ; got {names}")

    gen = torch.Generator().manual_seed(seed)
    forget_idx = sorted(torch.randperm(len(pool), generator=gen)[:n].tolist())
    fset = pool.select(forget_idx)
    k = fset.options.shape[1]
    if labels == "random":
        new = torch.randint(0, k, (n,), generator=gen)
    else:
        new = (fset.labels + torch.randint(1, k, (n,), generator=gen)) % k
    train_set = fset.relabeled(new)
    eval_samples, eval_options = _eval_set(task, eval_tasks, forget_idx, forget_split, test_split, max_eval, gen)
    eval_answers = torch.tensor([t[_scored_position(t, i)] for t, i in zip(eval_samples.targets, eval_samples.ids)])
    eval_labels = (eval_options == eval_answers[:, None]).long().argmax(1)
    is_forget = torch.tensor([g == f"{task.name}:forget" for g in eval_samples.groups])
    forget_new = torch.full((len(eval_samples),), -1, dtype=torch.long)
    forget_new[is_forget] = new  # eval order of the forget group = forget_idx order

    dev = torch.device(device) if device is not None else default_device()
    model = _load_source(source).to(dev)
    kind, save = _saver(model, build)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = name or f"forget-{task.name}"
    eval_samples.save(tmp / "samples.parquet")
    save_choices(tmp, eval_samples, eval_options)
    write_parquet_atomic(pl.DataFrame({"sample_id": [f"{task.name}/{i}" for i in train_set.ids],
                                       "label": new.numpy(), "true_label": fset.labels.numpy()}),
                         tmp / "forget_set.parquet")
    options = dict(task=task.name, n=n, labels=labels, lr=lr, epochs=epochs, batch_size=batch_size,
                   weight_decay=weight_decay, seed=seed, eval_tasks=[t.name for t in eval_tasks],
                   variability_layer=variability_layer, max_eval=max_eval)
    store = Store(tmp / "store", run=name)
    store.begin(PROBE, options, overwrite=True)

    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    ckpt_steps = sorted({int(round(s)) for s in np.linspace(0, total, n_checkpoints)})
    history = []

    def evaluate(step: int) -> None:
        layers = (variability_layer,) if step == 0 else ()
        probs, hidden = option_probs(model, eval_samples, eval_options, hidden_layers=layers, device=dev)
        model.train()
        rows = [choice_metrics(probs, eval_labels, eval_samples.groups)]
        pf = probs[is_forget]
        fit = (pf.gather(1, forget_new[is_forget][:, None])[:, 0] >= pf.amax(1)).double().mean()
        rows.append(pl.DataFrame({"group": [f"{task.name}:forget"], "metric": ["fit_random_labels"],
                                  "value": [float(fit)]}))
        for layer, h in hidden.items():
            for g in eval_samples.group_names:
                idx = [i for i, x in enumerate(eval_samples.groups) if x == g]
                if len(idx) >= 2:
                    rows.append(pl.DataFrame({"group": [g], "metric": ["variability"], "layer": [layer],
                                              "value": [representation_variability(h[idx])]}))
        df = pl.concat(rows, how="diagonal_relaxed")
        store.write(PROBE, step, df)
        acc = {g: v for g, m, v in df.select("group", "metric", "value").iter_rows() if m == "option_accuracy"}
        history.append({"step": step, **acc})
        save(tmp, step, {"step": step, "metrics": acc})

    try:
        _train_and_save(model, train_set, evaluate, ckpt_steps, n=n, lr=lr, epochs=epochs, batch_size=batch_size,
                        weight_decay=weight_decay, seed=seed, dev=dev, desc=f"forgetting {task.name}",
                        progress=progress)
        info = {"format": 1, "kind": kind, "name": name, "task": "forgetting", "forgetting": options,
                "steps": ckpt_steps, "history": history}
        if kind == "builtin":
            info["model"] = model.config.to_dict()
            (tmp / "run.json").write_text(json.dumps(info, indent=1))
        else:
            (tmp / "forgetting.json").write_text(json.dumps(info, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half run behind
        raise
    finally:
        del model
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return open_forgetting_run(out, build=build)


def _train_and_save(model, train_set: SampleSet, evaluate, ckpt_steps: list[int], *, n: int, lr: float, epochs: int,
                    batch_size: int, weight_decay: float, seed: int, dev, desc: str, progress: bool) -> None:
    """The fine-tuning loop: AdamW on next-token cross-entropy at the scored positions, evaluating (and saving)
    at step 0 and at every step of ``ckpt_steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order_gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    bar = tqdm(total=epochs * math.ceil(n / batch_size), desc=desc, disable=not progress, leave=False)
    evaluate(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_gen).tolist()
        for b in range(0, n, batch_size):
            x, y, mask = train_set.padded(order[b:b + batch_size])
            x, y, mask = x.to(dev), y.to(dev), mask.to(dev)
            logits = model(input_ids=x, attention_mask=mask).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step in ckpt_steps:
                evaluate(step)
                model.train()
    bar.close()
    model.eval()


def open_forgetting_run(folder: str | os.PathLike, build=None) -> Run:
    """A forgetting run saved by :func:`forget`, as a Run (with its forgetting settings in ``run.info``)."""
    folder = Path(folder)
    if (folder / "run.json").exists():
        return Run.from_folder(folder)
    info_file = folder / "forgetting.json"
    if not info_file.exists():
        raise InputError(f"{folder} is not a forgetting run (no run.json or forgetting.json)")
    info = json.loads(info_file.read_text())
    if info["kind"] == "hf":
        run = Run.from_folder(folder, name=info["name"])
    else:
        if build is None:
            raise InputError(f"{folder} holds plain state dicts; pass build= (a function returning an empty model)")
        run = Run.from_state_dicts(folder, build, name=info["name"])
    run.info = info
    return run


# --- tables over forgetting runs -----------------------------------------------------------------------------


def forgetting_results(runs: Mapping[str, Run] | Sequence[Run], chance: float = 0.5) -> pl.DataFrame:
    """One row per forgotten task × measured task × split (``forget``, ``train``, ``test``): accuracy before
    (step 0) and after (last checkpoint), forget gap and forget ratio (the flipped form for flipped runs)."""
    runs = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    rows = []
    for run in runs:
        opts = run.info.get("forgetting")
        if opts is None:
            raise InputError(f"run {run.name!r} is not a forgetting run (made by forget())")
        t = run.store.table(PROBE)
        acc = t.filter(pl.col("metric") == "option_accuracy")
        first, last = min(acc["step"]), max(acc["step"])
        for g in acc["group"].unique(maintain_order=True).to_list():
            a0 = acc.filter((pl.col("group") == g) & (pl.col("step") == first))["value"][0]
            a1 = acc.filter((pl.col("group") == g) & (pl.col("step") == last))["value"][0]
            measured, split = split_group(g)
            rows.append({
                "forgot": opts["task"], "task": measured, "split": split, "labels": opts["labels"],
                "acc_ft": a0, "acc_forget": a1, "forget_gap": forget_gap(a1, chance),
                "forget_ratio": forget_ratio(a0, a1, chance, flipped=opts["labels"] == "flipped"),
            })
    return pl.DataFrame(rows)


def matrix(results: pl.DataFrame, split: str = "test", value: str = "forget_ratio") -> tuple[list[str], torch.Tensor]:
    """The task × task matrix from :func:`forgetting_results`: row = task forgotten, column = task measured."""
    d = results.filter(pl.col("split") == split)
    names = sorted(set(d["forgot"].to_list()) | set(d["task"].to_list()))
    m = torch.full((len(names), len(names)), float("nan"), dtype=torch.float64)
    for a, b, v in d.select("forgot", "task", value).iter_rows():
        m[names.index(a), names.index(b)] = v
    return names, m


def predictor_table(runs: Mapping[str, Run] | Sequence[Run], chance: float = 0.5, split: str = "test") -> pl.DataFrame:
    """Per forgotten task: initial relative confidence and representation variability on its forget set (step 0),
    and the forget ratio on the forget set and on ``split``."""
    runs = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    res = forgetting_results(runs, chance)
    rows = []
    for run in runs:
        task = run.info["forgetting"]["task"]
        t = run.store.table(PROBE)
        at0 = t.filter((pl.col("step") == t["step"].min()) & (pl.col("group") == f"{task}:forget"))
        get = lambda m: at0.filter(pl.col("metric") == m)["value"]  # noqa: E731
        mine = res.filter((pl.col("forgot") == task) & (pl.col("task") == task))
        ratio = {s: v for s, v in mine.select("split", "forget_ratio").iter_rows()}
        rows.append({"task": task, "confidence": float(get("confidence")[0]),
                     "variability": float(get("variability")[0]) if len(get("variability")) else float("nan"),
                     "forget_ratio_forget": ratio.get("forget", float("nan")),
                     f"forget_ratio_{split}": ratio.get(split, float("nan"))})
    return pl.DataFrame(rows)


def predictor_correlations(predictors: pl.DataFrame, target: str = "forget_ratio_test",
                           method: str = "spearman") -> pl.DataFrame:
    """Correlation of each predictor with the forget ratio across tasks (coefficient and p-value)."""
    rows = []
    for p in ("confidence", "variability"):
        r, pv = correlation(predictors[p].to_numpy(), predictors[target].to_numpy(), method)
        rows.append({"predictor": p, "target": target, "method": method, "r": r, "p_value": pv,
                     "n_tasks": predictors.height})
    return pl.DataFrame(rows)


__all__ = [
    "ChoiceTask", "choice_metrics", "combine", "correlation", "forget", "forget_gap", "forget_matrix",
    "forget_ratio", "forgetting_results", "load_choices", "matrix", "open_forgetting_run", "option_probs",
    "predictor_correlations", "predictor_table", "relative_confidence", "representation_variability",
    "save_choices", "split_group", "tasks_from_run",
]
