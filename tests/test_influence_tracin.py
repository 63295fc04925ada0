"""TracIn-CP over checkpoints, against captum's TracInCP, and over a built-in Run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workbench.errors import InputError
from workbench.probes.influence import CrossEntropyTask, tracin_scores

TASK = CrossEntropyTask()


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoints(tmp_path):
    """Three checkpoints of a small classifier along a short training run, saved as state dicts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paths, models = [], []
    for i in range(3):
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        paths.append(str(tmp_path / f"ckpt{i}.pt"))
        torch.save(model.state_dict(), paths[-1])
        clone = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
        clone.load_state_dict(model.state_dict())
        models.append(clone)
    return models, paths, x, y


@pytest.mark.slow
def test_tracin_matches_captum(tmp_path):
    from captum.influence import TracInCP

    models, paths, x, y = checkpoints(tmp_path)
    rates = [0.1, 0.05, 0.02]
    xq, yq = torch.randn(4, 5), torch.randint(0, 3, (4,))
    docs = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    ours = tracin_scores(models, [(xq, yq)], docs, loss_fn=TASK.loss, learning_rates=rates, progress=False)

    def load(model, path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return rates[paths.index(path)]

    reference = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    tracin = TracInCP(reference, DataLoader(TensorDataset(x, y), batch_size=16), paths, checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=16, sample_wise_grads_per_batch=True)
    theirs = tracin.influence((xq, yq), show_progress=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_tracin_learning_rates_must_match_the_checkpoints(tmp_path):
    models, _, x, y = checkpoints(tmp_path)
    with pytest.raises(InputError, match="2 learning rates for 3 checkpoints"):
        tracin_scores(models, [(x[:2], y[:2])], [(x, y)], loss_fn=TASK.loss, learning_rates=[1, 2], progress=False)
    with pytest.raises(InputError, match="Run or a non-empty sequence"):
        tracin_scores([], [(x[:2], y[:2])], [(x, y)], loss_fn=TASK.loss, progress=False)


def test_tracin_over_a_run(tmp_path):
    """A Run of state-dict checkpoints gives what its models give; steps= picks checkpoints."""
    from workbench.runs import Run

    models, paths, x, y = checkpoints(tmp_path)
    run = Run.from_state_dicts(paths, lambda: nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)))
    assert run.steps == [0, 1, 2]
    queries, docs = [(x[:3], y[:3])], [(x[:20], y[:20])]
    kw = dict(loss_fn=TASK.loss, progress=False)
    from_run = tracin_scores(run, queries, docs, learning_rates=[0.1, 0.05, 0.02], **kw)
    torch.testing.assert_close(from_run, tracin_scores(models, queries, docs, learning_rates=[0.1, 0.05, 0.02], **kw))
    picked = tracin_scores(run, queries, docs, steps=[0, 2], learning_rates=[1.0, 3.0], **kw)
    torch.testing.assert_close(picked, tracin_scores(models[0], queries, docs, **kw)
                               + 3.0 * tracin_scores(models[2], queries, docs, **kw))
    with pytest.raises(InputError, match="none of steps"):
        tracin_scores(run, queries, docs, steps=[10**9], **kw)
