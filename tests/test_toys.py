"""The built-in modular-addition run: data, schedule, and the transition it must show."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from workbench import toys
from workbench.toys.train import checkpoint_steps, grokking_phases, lr_factor


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
    end = cfg.steps - cfg.hold
    start = int(end * (1 - cfg.decay_fraction))
    assert (start, end) == (600, 1000)  # the recipe the README describes
    assert lr_factor(cfg, start) == 1.0
    assert lr_factor(cfg, (start + end) // 2) == pytest.approx((1 + cfg.min_lr_ratio) / 2)
    assert lr_factor(cfg, end) == lr_factor(cfg, cfg.steps) == pytest.approx(cfg.min_lr_ratio)
    # the quick run follows the demo run's rate over its steps (so it is the same trajectory)
    assert all(lr_factor(toys.QUICK, s) == lr_factor(cfg, s) for s in range(toys.QUICK.steps + 1))


def test_training_does_not_change_the_callers_thread_count(tmp_path, tiny_run_cfg):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        toys.train_modular(replace(tiny_run_cfg, steps=2, n_checkpoints=2), tmp_path / "r", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _history(*rows):
    return [dict(step=s, train_acc=tr, test_acc=te) for s, tr, te in rows]


def test_grokking_phases_by_hand():
    ph = grokking_phases(_history((0, 0.05, 0.02), (100, 0.995, 0.03), (300, 1.0, 0.6), (600, 1.0, 0.96),
                                  (750, 1.0, 0.95), (900, 1.0, 0.99)))
    assert (ph.memorized, ph.test_at_memorized, ph.generalized, ph.steps) == (100, 0.03, 600, 900)
    assert ph.margin == pytest.approx(1 / 3) and ph.lowest_test_after == 0.95 and ph.groks()
    # generalized too late: less than a third of the run to spare
    assert not grokking_phases(_history((0, 0.1, 0.0), (100, 1.0, 0.0), (700, 1.0, 0.96), (900, 1.0, 0.97))).groks()
    # generalized without memorizing first: test accuracy was already high when train accuracy reached 0.99
    late = grokking_phases(_history((0, 0.1, 0.0), (100, 0.9, 0.6), (200, 0.99, 0.9), (900, 1.0, 1.0)))
    assert late.memorized == 200 and late.test_at_memorized == 0.9 and not late.groks()
    # fell back after generalizing (a wobble down to 0.85 is allowed), or ended below 0.95
    back = grokking_phases(_history((0, 0.1, 0.0), (100, 1.0, 0.0), (300, 1.0, 0.96), (600, 1.0, 0.8), (900, 1.0, 0.96)))
    assert back.generalized == 300 and back.lowest_test_after == 0.8 and not back.groks()
    assert grokking_phases(_history((0, 0.1, 0.0), (100, 1.0, 0.0), (300, 1.0, 0.96), (600, 1.0, 0.85),
                                    (900, 1.0, 0.96))).groks()
    assert not grokking_phases(_history((0, 0.1, 0.0), (100, 1.0, 0.0), (300, 1.0, 0.96), (900, 1.0, 0.94))).groks()
    # never memorized, never generalized
    never = grokking_phases(_history((0, 0.1, 0.0), (900, 0.5, 0.0)))
    assert never.memorized is None and never.generalized is None and never.margin is None and not never.groks()


def _check_demo_phases(history) -> None:
    """The README's claim for the built-in run: train accuracy reaches 0.99 while test accuracy is still
    below 0.5 (memorized), then test accuracy reaches 0.95 with at least a third of the run to spare and stays
    there (generalized: a wobble down to 0.85 allowed, at least 0.95 at the end)."""
    ph = grokking_phases(history)
    assert ph.memorized is not None, "the run never memorized its training pairs"
    assert ph.test_at_memorized < 0.5, f"test accuracy was already {ph.test_at_memorized} when it memorized"
    assert ph.generalized is not None, "test accuracy never reached 0.95 after memorization"
    assert ph.margin >= 1 / 3, f"generalized at step {ph.generalized} of {ph.steps}: less than a third to spare"
    assert ph.lowest_test_after >= 0.85 and ph.final_test >= 0.95 and ph.final_train >= 0.99, ph
    assert ph.groks()


@pytest.mark.slow
def test_the_demo_run_memorizes_then_generalizes_with_a_third_to_spare(quick_run):
    """The demo run the tests use (trained once into $WORKBENCH_HOME, about two minutes on one CPU thread, and
    shared with the test of the README's numbers): the phases and the margin hold. The quick run is its first
    600 steps (same data, initialization and rate): the checkpoints they share (steps 0 and 1) are
    bit-identical."""
    run = toys.ensure_run(toys.DEMO, progress=False)
    assert len(run.steps) >= 30
    _check_demo_phases(run.info["history"])
    shared = sorted(set(run.steps) & set(quick_run.steps))
    assert shared == [0, 1]
    for step in shared:
        name = f"step_{step:06d}/model.safetensors"
        ours, quick = load_file(run.root / name), load_file(quick_run.root / name)
        assert ours.keys() == quick.keys() and all(torch.equal(ours[k], quick[k]) for k in ours), name
