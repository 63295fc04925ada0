"""The built-in modular-addition run: data, schedule, the transition it must show, and the shipped copy."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from workbench import toys
from workbench.models.toy import ToyMoETransformer
from workbench.samples import SampleSet
from workbench.toys import shipped
from workbench.toys.train import checkpoint_steps, evaluate_run_weights, grokking_phases, lr_factor


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


def test_the_shipped_run_is_the_demo_recipe():
    folder = shipped.shipped_folder(toys.DEMO)
    assert folder is not None, "toys.DEMO changed without shipping its run again: python -m workbench.toys.shipped"
    info = json.loads((folder / "run.json").read_text())
    cfg = toys.DEMO
    assert info["steps"] == checkpoint_steps(cfg.steps, cfg.n_checkpoints) and len(info["steps"]) >= 30
    assert info["shipped"]["dtype"] == "float16"
    # the same data split as the recipe makes, and step 0 is the recipe's seeded initialization
    expect = toys.modular_addition(cfg.p, cfg.train_fraction, seed=cfg.seed)
    assert SampleSet.load(folder / "samples.parquet").to_frame().equals(expect.to_frame())
    torch.manual_seed(cfg.seed)
    init = ToyMoETransformer(cfg.model_config()).state_dict()
    step0 = load_file(folder / "step_000000" / "model.safetensors")
    assert step0.keys() == init.keys()
    for k, v in init.items():  # float16 keeps 11 significant bits: within half a unit of 2^-11
        torch.testing.assert_close(step0[k].float(), v, rtol=2.5e-4, atol=1e-7, msg=k)
    _check_demo_phases(info["history"])
    # the recorded metrics are those of the shipped weights (up to another CPU's rounding)
    last = info["steps"][-1]
    state = {k: v.float() for k, v in load_file(folder / f"step_{last:06d}" / "model.safetensors").items()}
    assert {"step": last, **evaluate_run_weights(info, folder / "samples.parquet", state)} == pytest.approx(
        info["history"][-1], rel=1e-4, abs=1e-6)


def test_ensure_run_installs_the_shipped_run_and_trains_only_when_asked(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(toys, "train_modular", lambda cfg, folder, progress=True: trained.append(folder))
    run = toys.ensure_run(toys.DEMO, root=tmp_path / "demo", progress=False)
    assert not trained and shipped.is_shipped_copy(run.root)
    source = shipped.shipped_folder(toys.DEMO)
    assert run.steps == json.loads((source / "run.json").read_text())["steps"]
    last = f"step_{run.steps[-1]:06d}"
    installed, packed = load_file(run.root / last / "model.safetensors"), load_file(source / last / "model.safetensors")
    assert all(installed[k].dtype == torch.float32 and torch.equal(installed[k], v.float()) for k, v in packed.items())
    model = run.checkpoint(run.steps[-1]).load()
    assert all(torch.equal(p, installed[k]) for k, p in model.state_dict().items())
    # an installed copy is reused; shipped=False (workbench train) or retrain=True train it here instead
    toys.ensure_run(toys.DEMO, root=tmp_path / "demo", progress=False)
    assert not trained
    toys.ensure_run(toys.DEMO, root=tmp_path / "demo", shipped=False, progress=False)
    toys.ensure_run(toys.DEMO, root=tmp_path / "other", retrain=True, progress=False)
    assert trained == [tmp_path / "demo", tmp_path / "other"]
    # a run with other settings is never taken from the shipped copy
    assert shipped.shipped_folder(replace(toys.DEMO, seed=1)) is None


@pytest.mark.slow
def test_training_the_demo_run_memorizes_then_generalizes(tmp_path):
    """Trains the demo recipe here (about a minute and a half on one CPU thread): the phases and the margin
    hold, and the first checkpoints agree with the shipped run's (after a few steps rounding has not yet
    grown; later the trajectories part ways on CPUs that round differently, though on the reference machine
    they stay equal)."""
    run = toys.ensure_run(toys.DEMO, root=tmp_path / "demo", shipped=False, progress=False)
    info = run.info
    assert "shipped" not in info and len(run.steps) >= 30
    _check_demo_phases(info["history"])
    source = shipped.shipped_folder(toys.DEMO)
    for step in run.steps[:4]:
        name = f"step_{step:06d}/model.safetensors"
        ours, ref = load_file(run.root / name), load_file(source / name)
        for k, v in ref.items():
            torch.testing.assert_close(ours[k], v.float(), rtol=1e-3, atol=1e-5, msg=f"{name} {k}")
