"""The forgetting protocol (docs/probes.md, "Forgetting"; Zhang, Choshen & Andreas, arXiv 2409.02228).

A model fine-tuned on a task with answer options (two in the study, chance 0.5) is fine-tuned again on ``n`` of
the task's training inputs (1000 in the study) whose labels are drawn uniformly from the options (or flipped
to a wrong option), with lr 1e-4. :func:`forget` runs it and saves the forgetting as a :class:`workbench.Run`
of checkpoints (step 0 is the model before forgetting), so every probe of the workbench applies to it, then
measures the run's checkpoints with the :class:`~workbench.probes.forgetting.Forgetting` measurement.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from workbench.capture import default_device
from workbench.errors import InputError
from workbench.measure import measure
from workbench.models.toy import ToyMoETransformer
from workbench.probes.forgetting.measurement import Forgetting
from workbench.probes.forgetting.tasks import ChoiceTask, combine, save_choices
from workbench.runs import Checkpoint, Run
from workbench.samples import IGNORE, SampleSet
from workbench.store import write_parquet_atomic

LABEL_MODES = ("random", "flipped")


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
    """How to save a checkpoint's weights so that Run.from_folder / from_state_dicts reads them, and the kind of
    run that makes."""
    if isinstance(model, ToyMoETransformer):
        def save(folder: Path, step: int) -> None:
            d = folder / f"step_{step:06d}"
            d.mkdir()
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(state, d / "model.safetensors", metadata={"format": "pt"})

        return "builtin", save
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        def save(folder: Path, step: int) -> None:
            model.save_pretrained(folder / f"step_{step:06d}")

        return "hf", save
    if build is None:
        raise InputError(
            f"forget() cannot save a {type(model).__name__} so that a Run reloads it: pass build= (a function "
            "returning an empty model of the same shape, as for Run.from_state_dicts)"
        )

    def save(folder: Path, step: int) -> None:
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

    dev = torch.device(device) if device is not None else default_device()
    model = _load_source(source).to(dev)
    kind, save = _saver(model, build)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = name or f"forget-{task.name}"
    protocol = dict(task=task.name, n=n, labels=labels, lr=lr, epochs=epochs, batch_size=batch_size,
                    weight_decay=weight_decay, seed=seed, eval_tasks=[t.name for t in eval_tasks],
                    variability_layer=variability_layer, max_eval=max_eval)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    ckpt_steps = sorted({int(round(s)) for s in np.linspace(0, total, n_checkpoints)})
    info_file = tmp / ("run.json" if kind == "builtin" else "forgetting.json")

    def write_info(history: list[dict]) -> None:
        info = {"format": 1, "kind": kind, "name": name, "task": "forgetting", "forgetting": protocol,
                "steps": ckpt_steps, "history": history}
        if kind == "builtin":
            info["model"] = model_config
        info_file.write_text(json.dumps(info, indent=1))

    model_config = model.config.to_dict() if kind == "builtin" else None
    try:
        eval_samples.save(tmp / "samples.parquet")
        save_choices(tmp, eval_samples, eval_options)
        write_parquet_atomic(pl.DataFrame({"sample_id": [f"{task.name}/{i}" for i in train_set.ids],
                                           "label": new.numpy(), "true_label": fset.labels.numpy()}),
                             tmp / "forget_set.parquet")
        _train_and_save(model, train_set, lambda step: save(tmp, step), ckpt_steps, n=n, lr=lr, epochs=epochs,
                        batch_size=batch_size, weight_decay=weight_decay, seed=seed, dev=dev,
                        desc=f"forgetting {task.name}", progress=progress)
        del model
        # Measured after training, from the saved checkpoints, through the same loop as every measurement.
        write_info([])
        run = open_forgetting_run(tmp, build=build)
        table = Forgetting.table(measure(run, [Forgetting()], device=dev, progress=False))
        acc = {(s, g): v for s, g, m, v in table.select("step", "group", "metric", "value").iter_rows()
               if m == "option_accuracy"}
        history = [{"step": s, **{g: acc[s, g] for g in eval_samples.group_names if (s, g) in acc}}
                   for s in ckpt_steps]
        for h in history if kind != "state_dict" else ():
            metrics = {g: v for g, v in h.items() if g != "step"}
            (tmp / f"step_{h['step']:06d}" / "meta.json").write_text(
                json.dumps({"step": h["step"], "metrics": metrics}, indent=1))
        write_info(history)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half run behind
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return open_forgetting_run(out, build=build)


def _train_and_save(model, train_set: SampleSet, save, ckpt_steps: list[int], *, n: int, lr: float, epochs: int,
                    batch_size: int, weight_decay: float, seed: int, dev, desc: str, progress: bool) -> None:
    """The fine-tuning loop: AdamW on next-token cross-entropy at the scored positions, saving the model at
    step 0 and at every step of ``ckpt_steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    order_gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    bar = tqdm(total=epochs * math.ceil(n / batch_size), desc=desc, disable=not progress, leave=False)
    save(0)
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
                save(step)
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


__all__ = ["LABEL_MODES", "forget", "open_forgetting_run"]
