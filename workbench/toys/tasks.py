"""Built-in forgetting study: synthetic two-option tasks, a small MoE transformer trained on all of them,
then made to forget each task in turn by fine-tuning on random labels (docs/probes.md, "Forgetting").

Five tasks of different kinds, each a sequence ``[TASK, content..., ?]`` answered at the last position by
one of two tokens, ``A`` or ``B``:

- ``majority`` (aggregation): nine tokens from 0..63; A when at least five are "high" (32..63).
- ``compare`` (ordinal relation): two different numbers a, b; A when a > b.
- ``facts`` (memorized lookup): two filler tokens then an entity (0..63); A when the entity has a fixed,
  randomly drawn attribute. Train and test share entities but not contexts.
- ``sentiment`` (lexical, bag of words): five tokens, each with a fixed random valence ±1; A when the
  valences sum above 0.
- ``match`` (equality): three tokens x, y, z; A when z == x.

``ensure_tasks_run()`` trains the model once (a built-in run folder, so ``Run.from_folder`` reads it) and
runs :func:`workbench.probes.forgetting.forget` for each task, all under ``$WORKBENCH_HOME/runs`` in a folder
named by a hash of the settings, behind a file lock; later calls, the notebook and the tests reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.probes.forgetting import ChoiceTask, combine, forget, open_forgetting_run, save_choices
from workbench.runs import Run
from workbench.samples import IGNORE, SampleSet
from workbench.toys.cache import config_folder, locked, pinned_threads, quick_from_env
from workbench.toys.train import RUN_FORMAT, adamw, building, checkpoint_steps, save_checkpoint, train_loop

N_CONTENT = 64
QUERY, OPT_A, OPT_B = N_CONTENT, N_CONTENT + 1, N_CONTENT + 2
TASK_BASE = N_CONTENT + 3
TASKS = ("majority", "compare", "facts", "sentiment", "match")


@dataclass(frozen=True)
class TasksConfig:
    """Settings of the built-in forgetting study. Defaults are the full run; :data:`QUICK` is the test run."""

    tasks: tuple[str, ...] = TASKS
    n_train: int = 2000
    n_test: int = 500
    seed: int = 0
    # model
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 6
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 64
    # multi-task training
    steps: int = 600
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 50
    n_checkpoints: int = 10
    # forgetting: the study's n and lr; epochs, batch size and checkpoints are the toy's choice
    forget_n: int = 1000
    forget_labels: str = "random"
    forget_lr: float = 1e-4
    forget_epochs: int = 10
    forget_batch_size: int = 32
    forget_checkpoints: int = 6
    max_eval: int = 200
    variability_layer: int = -5
    name: str = "tasks-moe"

    def model_config(self) -> ToyConfig:
        return ToyConfig(vocab_size=TASK_BASE + len(self.tasks), n_ctx=11, d_model=self.d_model,
                         n_heads=self.n_heads, n_layers=self.n_layers, n_experts=self.n_experts, top_k=self.top_k,
                         d_expert=self.d_expert, layer_norm=True)


DEMO = TasksConfig()
QUICK = replace(DEMO, n_train=1300, n_test=200, steps=400, batch_size=128, n_checkpoints=5, forget_epochs=4,
                forget_checkpoints=4, max_eval=200, name="tasks-moe-quick")


# --- the tasks ---------------------------------------------------------------------------------------------------


def _draw(kind: str, g: torch.Generator, n: int, world: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` candidate inputs (content tokens) and labels (1 = A) of one task."""
    r = lambda hi, *shape: torch.randint(0, hi, shape, generator=g)  # noqa: E731
    if kind == "majority":
        x = r(N_CONTENT, n, 9)
        return x, ((x >= N_CONTENT // 2).sum(1) >= 5).long()
    if kind == "compare":
        a, b = r(N_CONTENT, n), r(N_CONTENT - 1, n)
        b = b + (b >= a).long()  # b != a
        return torch.stack([a, b], 1), (a > b).long()
    if kind == "facts":
        x = r(N_CONTENT, n, 3)
        return x, world["attribute"][x[:, 2]]
    if kind == "sentiment":
        x = r(N_CONTENT, n, 5)
        return x, (world["valence"][x].sum(1) > 0).long()
    if kind == "match":
        x = r(N_CONTENT, n, 3)
        same = r(2, n).bool()
        x[same, 2] = x[same, 0]
        x[~same, 2] = (x[~same, 0] + 1 + r(N_CONTENT - 1, int((~same).sum()))) % N_CONTENT
        return x, same.long()
    raise ValueError(kind)


def make_task(kind: str, index: int, n_train: int, n_test: int, seed: int = 0) -> ChoiceTask:
    """One task as a :class:`ChoiceTask` with splits ``train`` and ``test`` (distinct inputs)."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; the built-in tasks are {TASKS}")
    g = torch.Generator().manual_seed(seed * 1000 + index)
    world = {
        "attribute": torch.randint(0, 2, (N_CONTENT,), generator=g),
        "valence": torch.randperm(N_CONTENT, generator=g) % 2 * 2 - 1,
    }
    seen, xs, ys = set(), [], []
    while len(xs) < n_train + n_test:
        x, y = _draw(kind, g, 4 * (n_train + n_test), world)
        for row, lab in zip(x.tolist(), y.tolist()):
            key = tuple(row)
            if key not in seen:
                seen.add(key)
                xs.append(row)
                ys.append(lab)
    xs, ys = xs[: n_train + n_test], ys[: n_train + n_test]
    inputs = [[TASK_BASE + index, *row, QUERY] for row in xs]
    targets = [[IGNORE] * (len(row) - 1) + [OPT_A if lab else OPT_B] for row, lab in zip(inputs, ys)]
    groups = ["train"] * n_train + ["test"] * n_test
    samples = SampleSet(ids=[str(i) for i in range(len(xs))], groups=groups, input_ids=inputs, targets=targets)
    return ChoiceTask(kind, samples, torch.tensor([[OPT_A, OPT_B]] * len(xs)))


def make_tasks(cfg: TasksConfig = DEMO) -> dict[str, ChoiceTask]:
    return {k: make_task(k, i, cfg.n_train, cfg.n_test, cfg.seed) for i, k in enumerate(cfg.tasks)}


# --- multi-task training -----------------------------------------------------------------------------------------


def _two_option_accuracy(model, x, y, mask_last) -> float:
    with torch.no_grad():
        logits = model(x).logits[torch.arange(len(x)), mask_last]
        pred = torch.where(logits[:, OPT_A] > logits[:, OPT_B], OPT_A, OPT_B)
        return (pred == y).float().mean().item()


@pinned_threads()
def train_tasks(cfg: TasksConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train the model on every task at once and save the run (written to a temporary folder, then renamed)."""
    with building(out_dir) as tmp:
        torch.manual_seed(cfg.seed)
        tasks = make_tasks(cfg)
        samples, options = combine([t.prefixed() for t in tasks.values()])
        samples.save(tmp / "samples.parquet")
        save_choices(tmp, samples, options)

        x_all, y_all, mask = samples.padded(range(len(samples)))
        last = mask.sum(1) - 1
        answer = y_all[torch.arange(len(samples)), last]
        split_idx = {g: torch.tensor(samples.indices(g)) for g in samples.group_names}
        train_idx = torch.cat([i for g, i in split_idx.items() if g.endswith(":train")])

        model = ToyMoETransformer(cfg.model_config())
        opt = adamw(model, cfg.lr, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
        steps = checkpoint_steps(cfg.steps, cfg.n_checkpoints)
        history = []
        gen = torch.Generator().manual_seed(cfg.seed + 7)

        def on_checkpoint(step: int) -> dict:
            metrics = {g: _two_option_accuracy(model, x_all[i], answer[i], last[i]) for g, i in split_idx.items()}
            history.append({"step": step, **metrics})
            save_checkpoint(tmp, step, model, metrics)
            return dict(test=f"{sum(v for g, v in metrics.items() if g.endswith(':test')) / len(tasks):.2f}")

        def batch_loss() -> torch.Tensor:
            b = train_idx[torch.randint(0, len(train_idx), (cfg.batch_size,), generator=gen)]
            logits = model(x_all[b]).logits
            return F.cross_entropy(logits.flatten(0, 1), y_all[b].flatten(), ignore_index=IGNORE)

        seconds = train_loop(model, opt, sched, steps=cfg.steps, checkpoints=steps, batch_loss=batch_loss,
                             on_checkpoint=on_checkpoint, grad_clip=1.0, desc=f"training {cfg.name}",
                             progress=progress)
        meta = {
            "format": RUN_FORMAT, "kind": "builtin", "name": cfg.name, "task": "choice_tasks",
            "tasks": list(cfg.tasks), "model": cfg.model_config().to_dict(), "training": asdict(cfg), "steps": steps,
            "seconds": round(seconds, 1), "history": history,
        }
        (tmp / "run.json").write_text(json.dumps(meta, indent=1))
    return Path(out_dir)


# --- the cached study ----------------------------------------------------------------------------------------------


@dataclass
class TasksRun:
    """The built-in forgetting study: the multi-task training run and one forgetting run per task."""

    config: TasksConfig
    folder: Path
    train: "Run"  # noqa: F821
    forgetting: dict  # task -> Run

    def tasks(self) -> dict[str, ChoiceTask]:
        return make_tasks(self.config)


def study_folder(cfg: TasksConfig, root: str | os.PathLike | None = None) -> Path:
    return config_folder(cfg, root)


def ensure_tasks_run(
    config: TasksConfig | None = None,
    *,
    quick: bool | None = None,
    root: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> TasksRun:
    """The built-in forgetting study, trained first if needed (``quick`` defaults to ``WORKBENCH_QUICK=1``)."""
    if config is None:
        config = QUICK if quick_from_env(quick) else DEMO
    folder = study_folder(config, root)
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder), pinned_threads():
        if retrain or not (folder / "train" / "run.json").exists():
            for d in folder.glob("forget-*"):
                shutil.rmtree(d)
            train_tasks(config, folder / "train", progress=progress)
        train = Run.from_folder(folder / "train")
        tasks = make_tasks(config)
        runs = {}
        for name, task in tasks.items():
            out = folder / f"forget-{name}"
            if retrain or not (out / "run.json").exists():
                forget(train, task, out, n=config.forget_n, labels=config.forget_labels, lr=config.forget_lr,
                       epochs=config.forget_epochs, batch_size=config.forget_batch_size,
                       n_checkpoints=config.forget_checkpoints, max_eval=config.max_eval,
                       eval_tasks=[t for k, t in tasks.items() if k != name],
                       variability_layer=config.variability_layer,
                       seed=config.seed, device="cpu", progress=progress)
            runs[name] = open_forgetting_run(out)
    return TasksRun(config, folder, train, runs)


__all__ = ["DEMO", "QUICK", "TASKS", "TasksConfig", "TasksRun", "ensure_tasks_run", "make_task", "make_tasks",
           "study_folder", "train_tasks"]
