"""The built-in corpus and LM run, influence over checkpoints into the store, the findings, views and report."""

from __future__ import annotations

import re

import polars as pl
import pytest
import torch
from safetensors.torch import save_file

from workbench.errors import InputError
from workbench.probes.influence import fit_factors, pairwise_scores
from workbench.probes.influence.findings import correlation_by_type, per_query, score_matrix, summary
from workbench.probes.influence.lm import LMTask, batches, lm_queries
from workbench.gradients.moe import lm_modules
from workbench.probes.influence.measurement import influence_tables, measure_influence
from workbench.toys.influence import builtin_influence
from workbench.runs import Checkpoint, Run
from workbench.store import Store
from workbench.toys.corpus import CorpusConfig, make_corpus
from workbench.toys.lm import LMConfig, completion_correct, lm_corpus, train_lm
from workbench.models.toy import ToyConfig, ToyMoETransformer

MICRO = LMConfig(corpus=CorpusConfig(n_entities=4, attributes=("color",), procedural_per_task=50,
                                     n_factual_queries=3, n_reasoning_queries=2),
                 steps=60, n_checkpoints=3, d_model=32, d_expert=32, n_layers=2, batch_size=16, name="micro")
QUIET = dict(progress=False)


# Tiny models: a second intra-op thread only adds synchronization (and is slow on a busy machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    torch.set_num_threads(1)
    return Run.from_folder(train_lm(MICRO, tmp_path_factory.mktemp("lm") / "micro", progress=False))


# --- the corpus ------------------------------------------------------------------------------------------------
def test_corpus_is_seeded_and_queries_are_answerable_from_the_documents():
    a, b = make_corpus(CorpusConfig()), make_corpus(CorpusConfig())
    assert a.documents.equals(b.documents) and a.queries.equals(b.queries)
    assert not make_corpus(CorpusConfig(seed=1)).documents.equals(a.documents)
    texts = a.documents["text"].to_list()
    for q in a.queries.iter_rows(named=True):
        if q["kind"] == "factual":  # the question wording, with the answer, is one of the fact's documents
            assert f"{q['prompt']} {q['completion']} ." in texts
            continue
        # The problem is held out (its numbers appear in no document) ...
        nums = re.findall(r"\d+", q["prompt"])
        pattern = " , ".join(nums[:2]) if q["task"] == "slope" else f"( {nums[0]} + {nums[1]} ) * {nums[2]}"
        assert not any(pattern in t and (q["task"] != "slope" or " , ".join(nums[2:4]) in t) for t in texts)
        # ... but each of its steps is worked in some document.
        for step in re.findall(r"\d+ [-+*/] \d+ = \d+", q["completion"]):
            assert any(step in t for t in texts), step
    kinds = dict(a.documents.group_by("kind").len().iter_rows())
    assert kinds == {"factual": 32 * 3 * 3, "procedural": 2 * 300}


def test_word_tokenizer():
    c = make_corpus(CorpusConfig(n_entities=3))
    tok = c.tokenizer
    ids = tok("the color of " + c.queries["entity"].drop_nulls()[0] + " is red .")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == tok.decode(ids[1:])
    assert tok.decode(ids).startswith("the color of")
    with pytest.raises(InputError, match=r"words \['purple'\] are not in the corpus vocabulary"):
        tok("the color is purple")
    # every number up to the largest result is a token, so hand-written in-range queries encode
    assert all(str(n) in tok.index for n in range(19))


# --- the built-in LM run --------------------------------------------------------------------------------------
def test_lm_run_folder_reads_back(micro_run):
    info = micro_run.info
    assert info["kind"] == "builtin" and info["task"] == "corpus_lm" and micro_run.steps == info["steps"]
    model = micro_run.checkpoint(micro_run.steps[-1]).load()
    assert isinstance(model, ToyMoETransformer) and model.config.n_ctx >= 40
    corpus = lm_corpus(micro_run, selected_only=False)
    assert corpus.documents.height == len(micro_run.samples)
    q = pl.read_parquet(micro_run.root / "queries.parquet")
    assert {f"correct_{s}" for s in micro_run.steps} <= set(q.columns)
    # "correct" is greedy decoding reproducing the completion: check it token by token on every query
    samples = corpus.query_samples()
    correct = completion_correct(model, samples)
    for i in range(len(samples)):
        first = samples.targets[i].index(next(t for t in samples.targets[i] if t != -100))
        ids = samples.input_ids[i][: first + 1]
        completion = [t for t in samples.targets[i] if t != -100]
        out = []
        with torch.no_grad():
            for _ in completion:
                nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
        assert bool(correct[i]) == (out == completion)
    assert q.filter(pl.col("selected"))[f"correct_{micro_run.steps[-1]}"].all()


# --- influence over checkpoints ----------------------------------------------------------------------------------
def test_scores_in_the_store_equal_a_direct_computation(micro_run, tmp_path):
    run = Run.from_folder(micro_run.root, store_root=tmp_path)
    store = builtin_influence(run, steps=[run.steps[-1]], queries="all", top_k_tokens=2, **QUIET)
    tables = influence_tables(store)
    step = run.steps[-1]
    mat, q_ids, d_ids = score_matrix(tables["scores"], step)
    corpus = lm_corpus(run, selected_only=False)
    assert q_ids == corpus.queries["query_id"].to_list() and d_ids == corpus.documents["doc_id"].to_list()
    model = run.checkpoint(step).load()
    task, docs = LMTask(), corpus.document_samples()
    mods = lm_modules(model, documents=batches(docs))
    f = fit_factors(model, batches(docs), loss_fn=task.loss, modules=mods, mask_fn=task.mask, report=False, **QUIET)
    want = pairwise_scores(model, f, batches(corpus.query_samples()), batches(docs), loss_fn=task.loss,
                           measurement_fn=task.measurement, modules=mods, mask_fn=task.mask, **QUIET)
    assert torch.allclose(mat, want.double(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # per-token rows: for the top and bottom 2 documents of each query, they sum to the document's score
    sums = tables["tokens"].group_by("query_id", "doc_id").agg(pl.col("value").sum())
    assert sums.height >= 3 * len(q_ids)
    for qid, did, v in sums.iter_rows():
        s = float(mat[q_ids.index(qid), d_ids.index(did)])
        assert v == pytest.approx(s, rel=1e-3, abs=1e-3 * float(mat.abs().max()))
    nll = tables["nll"].sort("query_id")["value"].to_numpy()
    assert (nll > 0).all() and len(nll) == len(q_ids)


def test_resumes_per_checkpoint_and_refuses_other_options(micro_run, tmp_path):
    run = Run.from_folder(micro_run.root, store_root=tmp_path)
    store = builtin_influence(run, steps=run.steps[:1], queries="all", **QUIET)
    first = store.root / "influence" / f"step_{run.steps[0]:06d}.parquet"
    mtime = first.stat().st_mtime_ns
    builtin_influence(run, queries="all", **QUIET)
    assert first.stat().st_mtime_ns == mtime and store.steps("influence") == run.steps
    resumed = influence_tables(store)["scores"]
    fresh = influence_tables(builtin_influence(run, queries="all", overwrite=True, **QUIET))["scores"]
    assert resumed.sort("step", "query_id", "doc_id").equals(fresh.sort("step", "query_id", "doc_id"))
    with pytest.raises(Exception, match="other options"):
        builtin_influence(run, queries="all", strategy="kfac", **QUIET)


def test_a_series_of_different_architectures_is_refused(tmp_path, micro_run):
    corpus = lm_corpus(micro_run, selected_only=False)
    ckpts = []
    for step, d in ((0, 32), (10, 16)):
        torch.manual_seed(0)
        model = ToyMoETransformer(ToyConfig(vocab_size=len(corpus.tokenizer), n_ctx=64, d_model=d, n_layers=1,
                                            n_heads=2, n_experts=2, d_expert=16))
        save_file(model.state_dict(), tmp_path / f"step_{step}.safetensors")
        ckpts.append(Checkpoint(step, str(tmp_path / f"step_{step}.safetensors"), "state_dict",
                                builder=lambda m=model: ToyMoETransformer(m.config)))
    run = Run("mixed", ckpts, root=tmp_path)
    with pytest.raises(InputError, match="checkpoint at step 10 has another architecture than the one at step 0"):
        measure_influence(run, corpus.query_samples(), corpus.document_samples(), **QUIET)
    assert Store(tmp_path / "store").steps("influence") == [0]  # the finished checkpoint is kept


def test_bad_queries_are_refused_before_any_work(micro_run, tmp_path):
    run = Run.from_folder(micro_run.root, store_root=tmp_path)
    vocab = run.checkpoint(0).load().config.vocab_size

    def tok(text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [int(w) for w in text.split()]}

    docs = lm_corpus(run).document_samples()
    bad = lm_queries(tok, ["2 3"], [str(vocab + 5)], ids=["q"])
    with pytest.raises(InputError, match=f"query 'q' has token ids \\[{vocab + 5}\\] outside the model's vocabulary"):
        measure_influence(run, bad, docs, **QUIET)
    with pytest.raises(InputError, match="modules must be one of"):
        measure_influence(run, bad, docs, modules="attention", **QUIET)
    assert Store(tmp_path / "store").steps("influence") == []


# --- findings, by hand ------------------------------------------------------------------------------------------------
def _hand_tables():
    docs = pl.DataFrame({
        "doc_id": ["d0", "d1", "d2", "d3"], "group": ["g"] * 4,
        "tokens": [["the", "color", "of", "kalo", "is", "red"], ["the", "color", "of", "mizo", "is", "red"],
                   ["1", "+", "2", "=", "3"], ["rise", "3", "-", "1", "=", "2"]],
        "kind": ["factual", "factual", "procedural", "procedural"], "task": ["color", "color", "arith", "slope"],
        "entity": ["kalo", "mizo", None, None], "attribute": ["color", "color", None, None]})
    queries = pl.DataFrame({
        "query_id": ["f0", "f1", "a0", "a1"], "group": ["factual", "factual", "r", "r"],
        "kind": ["factual", "factual", "reasoning", "reasoning"], "task": ["color", "color", "arith", "arith"],
        "entity": ["kalo", "mizo", None, None], "attribute": ["color", "color", None, None],
        "answer": ["red", "red", "3", "9"]})
    s = {"f0": [4.0, 1.0, 0.5, 0.2], "f1": [0.1, 3.0, 0.3, 2.0], "a0": [0.2, 0.1, 5.0, 1.0], "a1": [0.1, 0.3, 4.0, 2.0]}
    scores = pl.DataFrame([{"step": 7, "group": "x", "query_id": q, "doc_id": f"d{j}", "value": v}
                           for q, vals in s.items() for j, v in enumerate(vals)])
    return {"scores": scores, "documents": docs, "queries": queries}, s


def test_findings_by_hand():
    tables, s = _hand_tables()
    pq = per_query(tables, k=2).sort("query_id")
    row = {r["query_id"]: r for r in pq.iter_rows(named=True)}
    assert row["f0"]["fact_in_top_k"] == 1.0 and row["f1"]["fact_in_top_k"] == 1.0  # d0 / d1 in the top 2
    assert per_query(tables, k=1).filter(pl.col("query_id") == "f1")["fact_in_top_k"].item() == 1.0
    assert row["a0"]["procedural_share"] == 0.5  # top 2 of a0: d2 (arith) and d3 (slope, another task)
    assert row["a0"]["answer_in_top_k"] == 1.0 and row["a1"]["answer_in_top_k"] == 0.0
    assert row["f0"]["type"] == "factual" and row["a0"]["type"] == "reasoning:arith"
    corr = correlation_by_type(tables, 7)
    a = torch.corrcoef(torch.tensor([s["a0"], s["a1"]]))[0, 1].item()
    f = torch.corrcoef(torch.tensor([s["f0"], s["f1"]]))[0, 1].item()
    got = {(r["type_a"], r["type_b"]): r["mean"] for r in corr.iter_rows(named=True)}
    assert got[("reasoning:arith", "reasoning:arith")] == pytest.approx(a)
    assert got[("factual", "factual")] == pytest.approx(f)
    summ = summary(tables, k=2)
    assert summ.filter(pl.col("type") == "reasoning:arith")["correlation"].item() == pytest.approx(a)
    assert summ.filter(pl.col("type") == "factual")["queries"].item() == 2


# --- views and report ------------------------------------------------------------------------------------------
def test_figures_widget_and_report_section(micro_run, tmp_path):
    from widgets import InfluenceBrowser
    from workbench.probes.influence import figures as figs
    from workbench.measure import registry
    from workbench.probes.influence import Influence
    from workbench.report import build_sections

    assert Influence.section(Store(tmp_path / "empty"), None) is None
    run = Run.from_folder(micro_run.root, store_root=tmp_path)
    store = builtin_influence(run, queries="all", top_k_tokens=2, **QUIET)
    tables = influence_tables(store)
    qid = tables["queries"]["query_id"][-1]
    fig = figs.top_documents_figure(tables, None, qid, k=2)
    assert len(fig.data[0].x) == 4 and fig.data[0].x[0] >= fig.data[0].x[-1]
    tok = figs.token_figure(tables, run.steps[-1], qid, k=2)
    row = [v for v in tok.data[0].z[0] if v is not None]
    top = figs.ranked_documents(tables, run.steps[-1], qid, 2)["value"][0]
    assert sum(row) == pytest.approx(top, rel=1e-3, abs=1e-6)
    corr = figs.correlation_figure(tables, run.steps[0])
    assert len(corr.data[0].z) == tables["queries"].height
    sec = Influence.section(store, run)
    assert sec is not None and sec.title.startswith("Influence")
    assert registry()["influence"] is Influence
    assert any(s.title.startswith("Influence") for s in build_sections(store, run))
    view = InfluenceBrowser(run, k=2)
    view.set_query(qid)
    view.set_step(run.steps[0])
    assert view.query == qid and view.step == run.steps[0] and "<span" in view.text.value
    # the query menu rebuilt the document panels for the picked query
    other = next(q for q in tables["scores"]["query_id"].unique(maintain_order=True).to_list() if q != qid)
    view.set_query(other)
    expect = figs.top_documents_figure(tables, run.steps[0], other, 2)
    shown = view.figures["documents"]
    assert shown.layout.title.text == expect.layout.title.text and shown.layout.title.text.startswith(other)
    assert list(shown.data[0].x) == list(expect.data[0].x)
