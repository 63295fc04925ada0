"""Influence recipes for the built-in runs: the language-model run's corpus, and the grokking run's
training pairs at its phases."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from workbench.errors import InputError
from workbench.probes.influence.measurement import measure_influence
from workbench.runs import Run
from workbench.samples import SampleSet
from workbench.store import Store
from workbench.toys.lm import lm_corpus
from workbench.toys.modular import ModularTokenizer


def builtin_influence(run: Run, *, steps: Sequence[int] | None = None,
                      queries: str = "selected", **kwargs) -> Store:
    """:func:`measure_influence` on the built-in language-model run (:func:`workbench.toys.lm.ensure_lm_run`):
    its documents, its queries (``"selected"``: those the last checkpoint answers right; ``"all"``: every
    candidate), its tokenizer and the corpus's information columns."""
    if queries not in ("selected", "all"):
        raise InputError(f"queries must be 'selected' or 'all', not {queries!r}")
    corpus = lm_corpus(run, selected_only=queries == "selected")
    if corpus.queries.is_empty():
        raise InputError(f"the last checkpoint of run {run.name!r} answers none of its queries right, so none is "
                         "selected; train longer, or pass queries='all'")
    q_info = corpus.queries.select("query_id", "kind", "task", "entity", "attribute", "prompt", "completion", "answer")
    d_info = corpus.documents.select("doc_id", "kind", "task", "entity", "attribute", "value", "answer", "text")
    return measure_influence(run, corpus.query_samples(), corpus.document_samples(), steps=steps,
                             tokenizer=corpus.tokenizer, document_info=d_info, query_info=q_info, **kwargs)


def phase_steps(run: Run, n: int = 4) -> list[int]:
    """Checkpoints of a built-in grokking run at its phases: where train accuracy first reaches 0.99
    (memorized), where test accuracy first reaches 0.5 and 0.95 (generalizing), and the last; evenly spaced
    checkpoints when the run recorded no accuracies. At most ``n`` distinct steps, in order."""
    metrics = run.metrics()
    steps = run.steps
    if not {"train_acc", "test_acc"} <= set(metrics.columns):
        return sorted({steps[round(i * (len(steps) - 1) / max(1, n - 1))] for i in range(n)})

    def first(col: str, level: float) -> int | None:
        hit = metrics.filter(pl.col(col) >= level)["step"]
        return int(hit.min()) if len(hit) else None

    picks = [first("train_acc", 0.99), first("test_acc", 0.5), first("test_acc", 0.95), steps[-1]]
    return sorted({s for s in picks if s is not None})[:n]


def grokking_influence(run: Run, *, steps: Sequence[int] | None = None, n_queries: int = 16, seed: int = 0,
                       **kwargs) -> Store:
    """:func:`measure_influence` on a built-in modular-addition run: the training pairs are the documents
    (their loss is the training loss: the answer after ``a b =``), ``n_queries`` test pairs drawn with
    ``seed`` are the queries, at :func:`phase_steps` by default. The information columns hold each pair's
    ``a``, ``b``, ``answer`` and text, so the views show ``3 + 4 = 7`` and
    :func:`~workbench.probes.influence.findings.same_answer_share` can ask whether a test answer leans on
    training pairs with the same answer."""
    samples = run.samples
    if samples is None or not {"train", "test"} <= set(samples.groups):
        raise InputError(f"run {run.name!r} has no train and test samples; give a built-in modular-addition run")
    p = samples.max_token()  # the '=' sign; the numbers are 0..p-1
    docs, tests = samples.group("train"), samples.group("test")
    if n_queries < 1:
        raise InputError(f"n_queries must be at least 1, not {n_queries}")
    pick = torch.randperm(len(tests), generator=torch.Generator().manual_seed(seed))[: min(n_queries, len(tests))]
    queries = tests.select(sorted(pick.tolist()))

    def info(s: SampleSet, id_name: str) -> pl.DataFrame:
        a = [x[0] for x in s.input_ids]
        b = [x[1] for x in s.input_ids]
        c = [y[-1] for y in s.targets]
        return pl.DataFrame({id_name: s.ids, "a": a, "b": b, "answer": c,
                             "prompt": [f"{x} + {y} =" for x, y in zip(a, b)], "completion": [str(v) for v in c],
                             "text": [f"{x} + {y} = {z}" for x, y, z in zip(a, b, c)]})

    return measure_influence(run, queries, docs, steps=steps if steps is not None else phase_steps(run),
                             tokenizer=ModularTokenizer(p), document_info=info(docs, "doc_id"),
                             query_info=info(queries, "query_id"), **kwargs)


__all__ = ["builtin_influence", "grokking_influence", "phase_steps"]
