"""The built-in modular-addition run: data, schedule, and the transition it must show."""

from dataclasses import replace

import pytest
import torch

from workbench import toys
from workbench.toys.train import checkpoint_steps, lr_factor


def test_modular_addition_splits_all_pairs():
    s = toys.modular_addition(7, 0.5, seed=3)
    assert len(s) == 49 and len(s.indices("train")) == 24 and len(s.indices("test")) == 25
    i = s.ids.index("5+4")
    assert s.input_ids[i] == [5, 4, 7] and s.targets[i] == [-100, -100, 2]
    assert toys.modular_addition(7, 0.5, seed=3).groups == s.groups != toys.modular_addition(7, 0.5, seed=4).groups


def test_checkpoints_cover_both_phases():
    steps = checkpoint_steps(3000, 40)
    assert steps[0] == 0 and steps[-1] == 3000 and len(steps) >= 30
    assert sum(s < 300 for s in steps) >= 15  # dense early, where memorization happens
    gaps = [b - a for a, b in zip(steps, steps[1:]) if a >= 300]
    assert max(gaps) <= 3000 / 19  # and no long blind stretch later


def test_warmup_stable_decay_schedule():
    cfg = toys.DEMO
    assert lr_factor(cfg, 0) == pytest.approx(1 / cfg.warmup)
    assert lr_factor(cfg, cfg.warmup) == 1.0
    start = int(cfg.steps * (1 - cfg.decay_fraction))
    assert lr_factor(cfg, start) == 1.0
    assert lr_factor(cfg, cfg.steps) == pytest.approx(cfg.min_lr_ratio)


def test_training_does_not_change_the_callers_thread_count(tmp_path, tiny_run_cfg):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        toys.train_modular(replace(tiny_run_cfg, steps=2, n_checkpoints=2), tmp_path / "r", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_demo_run_memorizes_then_generalizes():
    """The README's claim: train accuracy >= 0.99 while test accuracy is still <= 0.5, later test >= 0.95.
    Trains the full demo run once (about 2.5 minutes on one CPU thread) unless it is cached."""
    run = toys.ensure_run(toys.DEMO, progress=False)
    history = run.info["history"]
    memorized = [h for h in history if h["train_acc"] >= 0.99 and h["test_acc"] <= 0.5]
    assert memorized, "no checkpoint has memorized the training pairs before generalizing"
    first_mem = memorized[0]["step"]
    generalized = [h for h in history if h["step"] > first_mem and h["test_acc"] >= 0.95]
    assert generalized, "test accuracy never reached 0.95 after memorization"
    assert history[-1]["test_acc"] >= 0.95 and history[-1]["train_acc"] >= 0.99
    assert len(run.steps) >= 30
