"""Agreement with kronfluence 1.0.1, the public reference implementation of the same estimator.

kronfluence is installed with --no-deps (it declares torchvision). On torch 2.13 / transformers 5.x it imports
and runs; the only symptom is a FutureWarning about ``torch.cuda.amp.GradScaler``, silenced here. Scores of
every strategy must match at Pearson >= 0.99999 (they match to float32 rounding), identity to float tolerance.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from workbench.probes.influence import STRATEGIES, CrossEntropyTask, fit_factors, pairwise_scores, self_scores

kronfluence = pytest.importorskip("kronfluence")


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def kronfluence_scores(model, task, train_ds, query_ds, *, strategy, tmp_path, batch_size, query_batch_size,
                       mask_key=None, empirical=True, self_influence=False):
    """Pairwise (and optionally self) scores from kronfluence for a CrossEntropyTask-like task."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class KTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return task.loss(model, batch, sample=sample)

        def compute_measurement(self, batch, model):
            return task.measurement(model, batch)

        def get_attention_mask(self, batch):
            return batch[mask_key] if mask_key else None

    ktask = KTask()
    with warnings.catch_warnings(), fast_release():
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler is deprecated in torch 2.13
        kmodel = prepare_model(model, ktask)
        an = Analyzer("agree", kmodel, ktask, output_dir=str(tmp_path), disable_tqdm=True, disable_model_save=True)
        an.fit_all_factors("f", train_ds, per_device_batch_size=batch_size, overwrite_output_dir=True,
                           factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=empirical))
        an.compute_pairwise_scores("s", "f", query_dataset=query_ds, train_dataset=train_ds,
                                   per_device_query_batch_size=query_batch_size,
                                   per_device_train_batch_size=batch_size, overwrite_output_dir=True,
                                   score_args=ScoreArguments(damping_factor=None))
        pair = an.load_pairwise_scores("s")["all_modules"]
        own = None
        if self_influence:
            an.compute_self_scores("self", "f", train_dataset=train_ds, per_device_train_batch_size=batch_size,
                                   overwrite_output_dir=True, score_args=ScoreArguments(damping_factor=None))
            own = an.load_self_scores("self")["all_modules"]
    return pair, own


@contextmanager
def fast_release():
    """kronfluence calls gc.collect() and torch.compiler.reset() around every phase (about 0.5 s each in a
    test process); nothing here needs them, so they are skipped for the duration (speed only)."""
    import kronfluence.utils.state as state

    with mock.patch.object(state, "gc", SimpleNamespace(collect=lambda: 0)), \
            mock.patch.object(torch.compiler, "reset", lambda: None):
        yield


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, x, y


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_classifier_matches_kronfluence(strategy, tmp_path):
    model, x, y = classifier()
    task = CrossEntropyTask()
    docs = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    queries = [(x[:5], y[:5])]
    factors = fit_factors(model, docs, loss_fn=task.loss, strategy=strategy, fisher="empirical", progress=False,
                          report=False)
    ours = pairwise_scores(model, factors, queries, docs, loss_fn=task.loss, progress=False)
    ours_self = self_scores(model, factors, docs, loss_fn=task.loss, progress=False)
    theirs, theirs_self = kronfluence_scores(model, task, TensorDataset(x, y), TensorDataset(x[:5], y[:5]),
                                             strategy=strategy, tmp_path=tmp_path, batch_size=8,
                                             query_batch_size=5, self_influence=True)
    print(f"{strategy}: pearson {pearson(ours, theirs):.6f}")
    # The README's claim: Pearson 1.00000 for every strategy (to five decimals)
    assert pearson(ours, theirs) >= 0.99999
    assert pearson(ours_self, theirs_self) >= 0.99999
    if strategy == "identity":
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    else:  # the same float32 arithmetic up to summation order
        torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3 * float(theirs.abs().max()))


class _Dicts(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def lm_data(n, length, seed, vocab=96):
    """Random token sequences, right-padded at random lengths; labels shifted, -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(data, size):
    n = len(data["input_ids"])
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def lm_task():
    return CrossEntropyTask(
        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
        targets=lambda b: b["labels"],
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_language_model_matches_kronfluence(strategy, tmp_path):
    from tests.tiny_models import tiny_model

    model = tiny_model("gpt_neox", n_layers=2)
    docs, queries = lm_data(24, 12, 0), lm_data(4, 12, 1)
    task = lm_task()
    mask_fn = lambda b: b["attention_mask"]  # noqa: E731
    factors = fit_factors(model, batches(docs, 8), loss_fn=task.loss, strategy=strategy, fisher="empirical",
                          mask_fn=mask_fn, progress=False, report=False)
    ours = pairwise_scores(model, factors, batches(queries, 4), batches(docs, 8), loss_fn=task.loss,
                           mask_fn=mask_fn, progress=False)
    theirs, _ = kronfluence_scores(model, task, _Dicts(docs), _Dicts(queries), strategy=strategy,
                                   tmp_path=tmp_path, batch_size=8, query_batch_size=4, mask_key="attention_mask")
    print(f"lm {strategy}: pearson {pearson(ours, theirs):.6f}")
    assert pearson(ours, theirs) >= 0.99999
    if strategy == "identity":
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))


class SeededTask:
    """Cross-entropy whose sampled labels come from a generator seeded by the batch itself, so that both
    implementations draw the same labels for the true Fisher."""

    def loss(self, model, batch, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            g = torch.Generator().manual_seed(int(x.abs().sum() * 1000))
            y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=g).flatten()
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    def measurement(self, model, batch):
        return self.loss(model, batch)


@pytest.mark.slow
def test_true_fisher_matches_kronfluence(tmp_path):
    model, x, y = classifier()
    task = SeededTask()
    docs = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    factors = fit_factors(model, docs, loss_fn=task.loss, strategy="ekfac", fisher="true", progress=False,
                          report=False)
    ours = pairwise_scores(model, factors, [(x[:5], y[:5])], docs, loss_fn=task.loss, progress=False)
    theirs, _ = kronfluence_scores(model, task, TensorDataset(x, y), TensorDataset(x[:5], y[:5]), strategy="ekfac",
                                   tmp_path=tmp_path, batch_size=8, query_batch_size=5, empirical=False)
    empirical = fit_factors(model, docs, loss_fn=task.loss, strategy="ekfac", fisher="empirical", progress=False,
                            report=False)
    assert not torch.allclose(pairwise_scores(model, empirical, [(x[:5], y[:5])], docs, loss_fn=task.loss,
                                              progress=False), ours, rtol=1e-2)
    assert pearson(ours, theirs) >= 0.99999
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3 * float(theirs.abs().max()))
