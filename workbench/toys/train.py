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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.samples import SampleSet
from workbench.toys.cache import pinned_threads
from workbench.toys.model import ToyConfig, ToyMoETransformer
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
    """Train a run and save it to ``out_dir``; written to a temporary folder first, then renamed, so a
    killed training never leaves a half run that looks complete."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    torch.manual_seed(cfg.seed)
    samples = modular_addition(cfg.p, cfg.train_fraction, seed=cfg.seed)
    samples.save(tmp / "samples.parquet")
    model = ToyMoETransformer(cfg.model_config())
    x_tr, y_tr = _batch(samples, "train")
    x_te, y_te = _batch(samples, "test")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        foreach=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    steps = checkpoint_steps(cfg.steps, cfg.n_checkpoints)
    history = []

    def save(step: int) -> None:
        model.eval()
        train_loss, train_acc = _evaluate(model, x_tr, y_tr)
        test_loss, test_acc = _evaluate(model, x_te, y_te)
        model.train()
        metrics = dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
        history.append({"step": step, **metrics})
        d = tmp / f"step_{step:06d}"
        d.mkdir()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        (d / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
        bar.set_postfix(train=f"{train_acc:.2f}", test=f"{test_acc:.2f}")

    start = time.perf_counter()
    bar = tqdm(range(cfg.steps + 1), desc=f"training {cfg.name}", disable=not progress, mininterval=1.0)
    todo = set(steps)
    model.train()
    for step in bar:
        if step in todo:
            save(step)
        if step == cfg.steps:
            break
        logits = model(x_tr).logits[:, -1]
        loss = F.cross_entropy(logits, y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start

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
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
