"""Training the built-in grokking run and saving it as a checkpoint series.

Layout of a built-in run folder (what :class:`workbench.Run` reads)::

    run.json                 name, kind, model and training config, checkpoint steps
    samples.parquet          the sample set (ids, groups, tokens, targets)
    step_000000/
        model.safetensors    weights
        meta.json            step and metrics at that step
    ...
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.samples import SampleSet
from workbench.toys.cache import pinned_threads
from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.toys.modular import modular_addition

RUN_FORMAT = 1


@dataclass(frozen=True)
class GrokConfig:
    """Settings of a built-in modular-addition run. Defaults are the run ``make demo`` trains."""

    p: int = 31
    train_fraction: float = 0.5
    steps: int = 3000
    lr: float = 7e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 200
    # "constant", "cosine" (decay from the end of warmup), or "wsd" (warmup-stable-decay: constant, then a
    # linear decay over the last decay_fraction of the steps, which steadies the late phase without slowing
    # the transition)
    schedule: str = "wsd"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.4
    grad_clip: float = 1.0
    seed: int = 0
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 4
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 64
    layer_norm: bool = True
    n_checkpoints: int = 40
    name: str = "modular-moe"
    extra: dict = field(default_factory=dict)

    def model_config(self) -> ToyConfig:
        return ToyConfig(
            vocab_size=self.p + 1,
            n_ctx=3,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            n_experts=self.n_experts,
            top_k=self.top_k,
            d_expert=self.d_expert,
            layer_norm=self.layer_norm,
        )


def checkpoint_steps(total: int, n: int) -> list[int]:
    """About ``n`` steps from 0 to ``total``: half log-spaced (the fast memorization phase early on), half
    evenly spaced (the slow generalization phase later)."""
    n_log = n // 2
    log = np.geomspace(1, total, n_log).round().astype(int)
    lin = np.linspace(0, total, n - n_log + 1).round().astype(int)
    steps = sorted(set(log.tolist()) | set(lin.tolist()) | {0, total})
    return steps


def lr_factor(cfg: GrokConfig, step: int) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        start = cfg.steps * (1 - cfg.decay_fraction)
        progress = min(1.0, max(0.0, (step - start) / max(1.0, cfg.steps - start)))
        return 1.0 - (1 - cfg.min_lr_ratio) * progress
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def building(out_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside ``out_dir``, renamed to ``out_dir`` when the block ends without error,
    so a killed training never leaves a half run that looks complete."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), foreach: bool | None = None):
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, foreach=foreach,
    )


def save_checkpoint(folder: Path, step: int, model: torch.nn.Module, metrics: dict) -> None:
    """``step_NNNNNN/model.safetensors`` and ``meta.json`` (step and metrics), the built-in run layout."""
    d = folder / f"step_{step:06d}"
    d.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors",
              metadata={"format": "pt"})
    (d / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))


def train_loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    *,
    steps: int,
    checkpoints: list[int],
    batch_loss: Callable[[], torch.Tensor],
    on_checkpoint: Callable[[int], dict],
    grad_clip: float,
    desc: str,
    progress: bool = True,
) -> float:
    """The loop every built-in run shares: at each checkpoint step call ``on_checkpoint`` in eval mode (its
    return value is shown on the progress bar), else one optimizer step on ``batch_loss()`` with gradient
    clipping. Returns the seconds it took."""
    start = time.perf_counter()
    bar = tqdm(range(steps + 1), desc=desc, disable=not progress, mininterval=1.0)
    todo = set(checkpoints)
    model.train()
    for step in bar:
        if step in todo:
            model.eval()
            shown = on_checkpoint(step)
            model.train()
            bar.set_postfix(**shown)
        if step == steps:
            break
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
    return time.perf_counter() - start


def _batch(samples: SampleSet, group: str):
    idx = samples.indices(group)
    x, y, _ = samples.padded(idx)
    return x, y[:, -1]


def _evaluate(model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x).logits[:, -1]
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


@pinned_threads()
def train_modular(cfg: GrokConfig, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train a run and save it to ``out_dir`` (through a temporary folder renamed at the end)."""
    with building(out_dir) as tmp:
        torch.manual_seed(cfg.seed)
        samples = modular_addition(cfg.p, cfg.train_fraction, seed=cfg.seed)
        samples.save(tmp / "samples.parquet")
        model = ToyMoETransformer(cfg.model_config())
        x_tr, y_tr = _batch(samples, "train")
        x_te, y_te = _batch(samples, "test")
        opt = adamw(model, cfg.lr, cfg.weight_decay, cfg.betas, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
        steps = checkpoint_steps(cfg.steps, cfg.n_checkpoints)
        history = []

        def on_checkpoint(step: int) -> dict:
            train_loss, train_acc = _evaluate(model, x_tr, y_tr)
            test_loss, test_acc = _evaluate(model, x_te, y_te)
            metrics = dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
            history.append({"step": step, **metrics})
            save_checkpoint(tmp, step, model, metrics)
            return dict(train=f"{train_acc:.2f}", test=f"{test_acc:.2f}")

        seconds = train_loop(
            model, opt, sched, steps=cfg.steps, checkpoints=steps,
            batch_loss=lambda: F.cross_entropy(model(x_tr).logits[:, -1], y_tr),
            on_checkpoint=on_checkpoint, grad_clip=cfg.grad_clip, desc=f"training {cfg.name}", progress=progress,
        )
        meta = {
            "format": RUN_FORMAT,
            "kind": "builtin",
            "name": cfg.name,
            "task": "modular_addition",
            "model": cfg.model_config().to_dict(),
            "training": asdict(cfg),
            "steps": steps,
            "seconds": round(seconds, 1),
            "history": history,
        }
        (tmp / "run.json").write_text(json.dumps(meta, indent=1))
    return Path(out_dir)
