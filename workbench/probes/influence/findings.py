"""The studies' per-query-type findings, read from the influence tables (docs/probes.md, "Influence").

Ruis et al. (arXiv 2411.12580) compared factual and reasoning queries: whether a factual query's answer
appears in its top documents, how often a reasoning query's top documents show the procedure of its own
task, how strongly queries of one type share influential documents (cross-query Pearson correlation), and
how concentrated influence is (share of positive influence in the top percentiles, power-law slope of the
sorted scores). These functions compute each of them per checkpoint from the tables that
:func:`~workbench.probes.influence.measurement.measure_influence` writes (``influence_tables``), using
the documents' and queries' information columns when present:

- a query's *type* is its ``kind`` (factual | reasoning) and, for reasoning, its ``task``; else its group;
- a document *states the fact* of a factual query when its ``entity`` and ``attribute`` equal the query's;
  the *answer appears* in a document when the query's ``answer`` is one of the document's tokens;
- a document is *procedural for the same task* when its ``kind`` is procedural and its ``task`` the query's.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from workbench.errors import InputError
from workbench.probes.influence.analysis import cross_query_correlation, powerlaw_slope, top_share


def score_matrix(scores: pl.DataFrame, step: int, query_ids: Sequence[str] | None = None,
                 doc_ids: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """The [queries, documents] score matrix at ``step`` from the long table, with its row and column ids."""
    at = scores.filter(pl.col("step") == step)
    if at.is_empty():
        raise InputError(f"no influence scores at step {step}; the steps are {sorted(scores['step'].unique())}")
    q = list(query_ids) if query_ids is not None else at["query_id"].unique(maintain_order=True).to_list()
    d = list(doc_ids) if doc_ids is not None else at["doc_id"].unique(maintain_order=True).to_list()
    wide = at.pivot(on="doc_id", index="query_id", values="value")
    wide = pl.DataFrame({"query_id": q}).join(wide, on="query_id", how="left")
    mat = torch.tensor(wide.select(d).to_numpy(), dtype=torch.float64)
    return mat, q, d


def query_types(queries: pl.DataFrame) -> pl.DataFrame:
    """query_id → type: ``factual``, ``reasoning:<task>``, or the query's group when no kind is known."""
    if "kind" in queries.columns:
        kind = pl.col("kind")
        t = pl.when(kind == "reasoning").then(pl.lit("reasoning:") + pl.col("task").fill_null("")).otherwise(kind)
        return queries.select("query_id", t.fill_null(pl.col("group")).alias("type"))
    return queries.select("query_id", pl.col("group").alias("type"))


def _top_ids(mat: torch.Tensor, d_ids: list[str], k: int) -> list[list[str]]:
    idx = torch.topk(mat, min(k, mat.shape[1]), dim=1).indices
    return [[d_ids[j] for j in row] for row in idx.tolist()]


def per_query(tables: dict, k: int = 10, percentiles=(1.0, 10.0)) -> pl.DataFrame:
    """Per (step, query): type, ``fact_in_top_k`` (a top-k document states the queried fact; factual only),
    ``answer_in_top_k`` (the answer's token appears in a top-k document), ``procedural_share`` (share of the
    top k that are procedural documents of the query's own task; reasoning only), ``top_share_<p>`` and
    ``powerlaw_slope``."""
    scores, docs, queries = tables["scores"], tables["documents"], tables["queries"]
    if scores.is_empty():
        raise InputError("the influence table has no scores; run measure_influence first")
    if docs is None or queries is None:
        raise InputError("the influence table has no documents/queries information; measure it again")
    types = query_types(queries)
    doc = {r["doc_id"]: r for r in docs.iter_rows(named=True)}
    qinfo = {r["query_id"]: r for r in queries.iter_rows(named=True)}
    rows = []
    for step in sorted(scores["step"].unique().to_list()):
        mat, q_ids, d_ids = score_matrix(scores, step)
        tops = _top_ids(mat, d_ids, k)
        shares = top_share(mat, percentiles)
        slopes = powerlaw_slope(mat)
        for qi, qid in enumerate(q_ids):
            q = qinfo.get(qid, {})
            top = [doc[d] for d in tops[qi]]
            row = {"step": step, "query_id": qid, "k": k}
            if q.get("kind") == "factual" and q.get("entity") is not None:
                row["fact_in_top_k"] = float(any(d.get("entity") == q["entity"] and
                                                  d.get("attribute") == q["attribute"] for d in top))
            if q.get("answer") is not None:
                row["answer_in_top_k"] = float(any(q["answer"] in (d.get("tokens") or []) for d in top))
            if q.get("kind") == "reasoning":
                row["procedural_share"] = sum(d.get("kind") == "procedural" and d.get("task") == q.get("task")
                                              for d in top) / len(top)
            for j, p in enumerate(percentiles):
                row[f"top_share_{p:g}"] = float(shares[qi, j])
            row["powerlaw_slope"] = float(slopes[qi])
            rows.append(row)
    out = pl.DataFrame(rows, infer_schema_length=None)
    return out.join(types, on="query_id", how="left")


def correlation_by_type(tables: dict, step: int) -> pl.DataFrame:
    """Mean Pearson correlation between the score vectors of pairs of distinct queries, per pair of types
    (``type_a``, ``type_b``, ``mean``, ``pairs``)."""
    mat, q_ids, _ = score_matrix(tables["scores"], step)
    corr = cross_query_correlation(mat)
    types = dict(query_types(tables["queries"]).iter_rows()) if tables.get("queries") is not None else {}
    t = [types.get(q, "all") for q in q_ids]
    acc: dict[tuple[str, str], list[float]] = {}
    for i in range(len(q_ids)):
        for j in range(i + 1, len(q_ids)):
            key = tuple(sorted((t[i], t[j])))
            acc.setdefault(key, []).append(float(corr[i, j]))
    return pl.DataFrame([{"step": step, "type_a": a, "type_b": b, "mean": sum(v) / len(v), "pairs": len(v)}
                         for (a, b), v in sorted(acc.items())])


def summary(tables: dict, k: int = 10) -> pl.DataFrame:
    """Per (step, query type): the means of :func:`per_query` and the within-type mean cross-query
    correlation (``correlation``). One table for the notebook, the figures and the README."""
    pq = per_query(tables, k)
    metrics = [c for c in pq.columns if c not in ("step", "query_id", "k", "type")]
    means = pq.group_by("step", "type").agg([pl.col(c).drop_nans().mean() for c in metrics]
                                            + [pl.len().alias("queries")])
    corr = pl.concat([correlation_by_type(tables, s) for s in sorted(pq["step"].unique().to_list())])
    within = corr.filter(pl.col("type_a") == pl.col("type_b")).select(
        "step", pl.col("type_a").alias("type"), pl.col("mean").alias("correlation"))
    return means.join(within, on=["step", "type"], how="left").sort("step", "type")


def same_answer_share(tables: dict, k: int = 10) -> pl.DataFrame:
    """Per (step, query): the share of the query's top ``k`` documents (``top``) and of its bottom ``k``
    (``bottom``) whose ``answer`` equals the query's, beside the share among all documents (``chance``).

    For the built-in modular-addition run (:func:`~workbench.toys.influence.grokking_influence`):
    does a held-out answer lean on training pairs with the same answer, as a model that computes the sum would,
    or on others, as a lookup would? Needs an ``answer`` column in both information tables."""
    scores, docs, queries = tables["scores"], tables["documents"], tables["queries"]
    if docs is None or queries is None or "answer" not in docs.columns or "answer" not in queries.columns:
        raise InputError("same_answer_share needs an 'answer' column in the documents' and queries' information "
                         "(grokking_influence writes them; pass document_info= and query_info= to measure_influence)")
    answer_of_doc = dict(docs.select("doc_id", "answer").iter_rows())
    answer_of_query = dict(queries.select("query_id", "answer").iter_rows())
    rows = []
    for step in sorted(scores["step"].unique().to_list()):
        mat, q_ids, d_ids = score_matrix(scores, step)
        d_answer = torch.tensor([answer_of_doc[d] for d in d_ids])
        kk = min(k, len(d_ids))
        top = torch.topk(mat, kk, dim=1).indices
        bottom = torch.topk(-mat, kk, dim=1).indices
        for qi, qid in enumerate(q_ids):
            same = d_answer == answer_of_query[qid]
            rows.append({"step": step, "query_id": qid, "k": kk, "top": float(same[top[qi]].float().mean()),
                         "bottom": float(same[bottom[qi]].float().mean()), "chance": float(same.float().mean())})
    return pl.DataFrame(rows)


__all__ = ["correlation_by_type", "per_query", "query_types", "same_answer_share", "score_matrix", "summary"]
