"""Influence on the built-in modular-addition run: the phases it is measured at, the stored tables (answers
shown after the prompt, per-token contributions that sum to the score), and the same-answer share."""

from __future__ import annotations

import warnings

import polars as pl
import pytest
import torch

from workbench.errors import InputError
from workbench.probes.influence.findings import same_answer_share
from workbench.gradients.moe import IdleExpertsWarning
from workbench.probes.influence.measurement import influence_tables
from workbench.toys.influence import grokking_influence, phase_steps
from workbench.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")


class _Metrics:
    """A stand-in run with recorded metrics."""

    def __init__(self, table: dict):
        self.table = pl.DataFrame(table)
        self.steps = self.table["step"].to_list()

    def metrics(self):
        return self.table


def test_phase_steps_are_memorized_generalizing_generalized_and_last():
    run = _Metrics({"step": [0, 5, 10, 20, 40, 50], "train_acc": [0.1, 0.99, 1, 1, 1, 1],
                    "test_acc": [0.0, 0.0, 0.3, 0.6, 0.96, 0.97]})
    assert phase_steps(run) == [5, 20, 40, 50]
    # never generalized: the memorized step and the last
    run = _Metrics({"step": [0, 5, 10], "train_acc": [0.1, 0.99, 1], "test_acc": [0.0, 0.0, 0.1]})
    assert phase_steps(run) == [5, 10]
    # no accuracies recorded: evenly spaced checkpoints
    run = _Metrics({"step": [0, 1, 2, 4, 8, 16, 32]})
    assert phase_steps(run, n=3) == [0, 4, 32]


def test_same_answer_share_by_hand():
    # Two queries with answers 1 and 2; four documents with answers 1, 1, 2, 3.
    docs = pl.DataFrame({"doc_id": ["a", "b", "c", "d"], "answer": [1, 1, 2, 3]})
    queries = pl.DataFrame({"query_id": ["q1", "q2"], "answer": [1, 2]})
    scores = pl.DataFrame({
        "step": [7] * 8, "query_id": ["q1"] * 4 + ["q2"] * 4, "doc_id": ["a", "b", "c", "d"] * 2,
        "value": [3.0, -1.0, 2.0, 0.0,    # q1: top 2 = a (answer 1), c (2); bottom 2 = b (1), d (3)
                  0.0, 1.0, 5.0, -2.0],   # q2: top 2 = c (2), b (1); bottom 2 = d (3), a (1)
    })
    out = same_answer_share({"scores": scores, "documents": docs, "queries": queries}, k=2).sort("query_id")
    assert out["top"].to_list() == [0.5, 0.5]
    assert out["bottom"].to_list() == [0.5, 0.0]
    assert out["chance"].to_list() == [0.5, 0.25]
    with pytest.raises(InputError, match="answer"):
        same_answer_share({"scores": scores, "documents": docs.drop("answer"), "queries": queries})


def test_grokking_influence_stores_pairs_with_their_answers(tiny_run, tmp_path):
    run = Run.from_folder(tiny_run.root, samples=tiny_run.samples, store_root=tmp_path)
    steps = run.steps[-2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleExpertsWarning)
        store = grokking_influence(run, steps=steps, n_queries=3, top_k_tokens=2, progress=False)
    tables = influence_tables(store)
    train = set(run.samples.group("train").ids)
    test = set(run.samples.group("test").ids)
    assert set(tables["documents"]["doc_id"].to_list()) == train
    assert set(tables["queries"]["query_id"].to_list()) <= test and tables["queries"].height == 3
    assert sorted(tables["scores"]["step"].unique().to_list()) == steps
    assert tables["scores"].height == len(steps) * 3 * len(train)
    # the documents are shown with their answer after "=": "a + b = c", tokens a, b, =, c
    p = run.samples.max_token()
    for d in tables["documents"].head(5).iter_rows(named=True):
        assert d["tokens"] == [str(d["a"]), str(d["b"]), "=", str(d["answer"])]
        assert d["answer"] == (d["a"] + d["b"]) % p and d["text"] == f"{d['a']} + {d['b']} = {d['answer']}"
    # every position's contribution is kept, the answer's included: they sum to each document's score
    tok = tables["tokens"].group_by("step", "query_id", "doc_id").agg(pl.col("value").sum(), pl.len())
    joined = tok.join(tables["scores"], on=["step", "query_id", "doc_id"], suffix="_score")
    assert joined.height == tok.height > 0 and set(joined["len"].to_list()) == {3}
    torch.testing.assert_close(torch.tensor(joined["value"].to_list()), torch.tensor(joined["value_score"].to_list()),
                               rtol=1e-4, atol=1e-6 * float(joined["value_score"].abs().max()))
    share = same_answer_share(tables, k=5)
    assert share.height == len(steps) * 3 and share["chance"].max() < 0.5
