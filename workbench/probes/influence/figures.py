"""Figures of the influence tables: top and bottom documents, per-token influence, cross-query correlation,
and the studies' findings per query type over checkpoints.

Builders take the dict :func:`workbench.probes.influence.measurement.influence_tables` returns (and,
for the findings, the table of :func:`workbench.probes.influence.findings.summary`). Per-step builders keep
the same traces at every step, so :func:`workbench.figures.with_slider` can animate them in reports.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import ALL_STEPS, Section, color, nearest_step, with_slider
from workbench.probes.influence.analysis import cross_query_correlation
from workbench.probes.influence.findings import query_types, same_answer_share, score_matrix
from workbench.probes.influence.findings import summary as findings_summary

#: Colors of document kinds (the built-in corpus) in bar charts.
KIND_COLORS = {"factual": "#1f77b4", "procedural": "#d62728"}


def _steps(tables: dict) -> list[int]:
    return sorted(tables["scores"]["step"].unique().to_list())


def _query(tables: dict, query_id: str | None) -> dict:
    queries = tables["queries"]
    ids = queries["query_id"].to_list() if queries is not None else tables["scores"]["query_id"].unique().to_list()
    if query_id is None:
        query_id = ids[0]
    if query_id not in ids:
        raise InputError(f"no query {query_id!r} in the influence table; the queries are {ids[:8]}...")
    if queries is None:
        return {"query_id": query_id}
    return queries.filter(pl.col("query_id") == query_id).row(0, named=True)


def query_label(q: dict, width: int = 70) -> str:
    """``prompt → completion`` of a query, shortened for titles."""
    if q.get("prompt") and q.get("completion"):
        text = f"{q['prompt']} → {q['completion']}"
    elif q.get("tokens"):
        toks, scored = q["tokens"], q.get("scored") or [False] * len(q["tokens"])
        prompt = " ".join(t for t, s in zip(toks, scored) if not s and t not in ("<bos>", "<pad>"))
        text = prompt + (f" → {q['completion']}" if q.get("completion") else "")
    else:
        text = q["query_id"]
    return text if len(text) <= width else text[: width - 1] + "…"


def _doc_text(d: dict, width: int = 90) -> str:
    text = d.get("text") or " ".join(t for t in (d.get("tokens") or []) if t not in ("<bos>", "<pad>"))
    return text if len(text) <= width else text[: width - 1] + "…"


def ranked_documents(tables: dict, step: int, query_id: str, k: int = 5) -> pl.DataFrame:
    """The ``k`` highest and ``k`` lowest scoring documents of a query at ``step``: doc_id, value, rank
    (1 = highest; negative ranks count from the lowest), with the documents' information."""
    at = tables["scores"].filter((pl.col("step") == step) & (pl.col("query_id") == query_id))
    if at.is_empty():
        raise InputError(f"no influence scores for query {query_id!r} at step {step}")
    at = at.sort("value", descending=True).with_row_index("i")
    n = at.height
    k = min(k, n // 2 if n > 1 else 1)
    top = at.head(k).with_columns(rank=pl.col("i").cast(pl.Int64) + 1)
    bottom = at.tail(k).with_columns(rank=pl.col("i").cast(pl.Int64) - n)
    out = pl.concat([top, bottom]).drop("i").unique("doc_id", keep="first", maintain_order=True)
    if tables.get("documents") is not None:
        out = out.join(tables["documents"].drop("group"), on="doc_id", how="left")
    return out


def rank_label(rank: int) -> str:
    """``top 1`` for the highest scoring document, ``bottom 1`` for the lowest."""
    return f"top {rank}" if rank > 0 else f"bottom {-rank}"


def top_documents_figure(tables: dict, step: int | None = None, query_id: str | None = None, k: int = 5,
                         width: int = 900) -> go.Figure:
    """Horizontal bars: the query's top ``k`` (above) and bottom ``k`` (below) documents with their scores,
    colored by document kind; each bar's label is its rank and the document's text (in full on hover)."""
    step = nearest_step(_steps(tables), step)
    q = _query(tables, query_id)
    ranked = ranked_documents(tables, step, q["query_id"], k)
    kinds = ranked["kind"].to_list() if "kind" in ranked.columns else [None] * ranked.height
    rows = list(ranked.iter_rows(named=True))
    # The document text goes in the axis label, not on the bar: text on short or negative bars collides with
    # the axis labels. Labels are unique (the rank leads), so the axis keeps one row per document.
    labels = [f"{rank_label(r['rank'])}: {html.escape(_doc_text(r, 48))}" for r in rows]
    fig = go.Figure(go.Bar(
        x=[r["value"] for r in rows], y=labels, orientation="h",
        marker_color=[KIND_COLORS.get(kd, color(str(r.get("group") or kd), 0)) for kd, r in zip(kinds, rows)],
        hovertext=[f"{r['doc_id']} ({kd or ''})<br>{html.escape(_doc_text(r, 200))}<br>score {r['value']:.4g}"
                   for kd, r in zip(kinds, rows)], hoverinfo="text"))
    fig.update_yaxes(autorange="reversed", automargin=True)
    # A fixed range: scores differ by orders of magnitude between checkpoints, and a slider keeps ranges fixed.
    values = [r["value"] for r in rows]
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    pad = 0.05 * ((hi - lo) or 1.0)
    fig.update_xaxes(title_text="influence score", zeroline=True, zerolinecolor="#444", range=[lo - pad, hi + pad])
    fig.update_layout(width=width, height=120 + 28 * len(rows), margin=dict(t=60, l=20, r=20, b=40),
                      title=dict(text=f"{q['query_id']}: {html.escape(query_label(q))}<br><sup>top and bottom "
                                      f"documents at step {step}"
                                      + (" (red: procedural, blue: factual)" if any(kinds) else "") + "</sup>",
                                 x=0.01))
    return fig


def token_figure(tables: dict, step: int | None = None, query_id: str | None = None, k: int = 5,
                 max_tokens: int = 60, width: int = 1000) -> go.Figure:
    """Per-token influence inside the query's top and bottom documents: one row per document, one cell per
    token, colored by the contribution of the position that predicts it (red raises the completion's
    probability, blue lowers it); contributions of a row sum to the document's score."""
    steps = _steps(tables)
    step = nearest_step(steps, step)
    q = _query(tables, query_id)
    ranked = ranked_documents(tables, step, q["query_id"], k)
    toks = tables["tokens"].filter((pl.col("step") == step) & (pl.col("query_id") == q["query_id"]))
    rows = []
    for r in ranked.iter_rows(named=True):
        words = (r.get("tokens") or [])[:max_tokens]
        vals = [None] * len(words)
        for pos, v in toks.filter(pl.col("doc_id") == r["doc_id"]).select("position", "value").iter_rows():
            if pos < len(vals):
                vals[pos] = v
        rows.append((f"{rank_label(r['rank'])}: {r['doc_id']}", words, vals, r["value"]))
    width_tokens = max((len(w) for _, w, _, _ in rows), default=1)
    z = [v + [None] * (width_tokens - len(v)) for _, _, v, _ in rows]
    text = [w + [""] * (width_tokens - len(w)) for _, w, _, _ in rows]
    lim = max((abs(x) for r in z for x in r if x is not None), default=1.0) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", textfont=dict(size=10), y=[r[0] for r in rows],
        x=list(range(width_tokens)), colorscale="RdBu_r", zmin=-lim, zmax=lim, xgap=1, ygap=2,
        colorbar=dict(title="token<br>influence"),
        hovertemplate="token %{text} (position %{x})<br>contribution %{z:.4g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(title_text="token position", showgrid=False, dtick=1)
    fig.update_layout(width=width, height=110 + 30 * len(rows), margin=dict(t=50, l=20, r=20, b=40),
                      title=dict(text=f"per-token influence on {q['query_id']} at step {step}", x=0.01))
    return fig


def token_html(tables: dict, step: int, query_id: str, doc_id: str) -> str:
    """One document as HTML with each token's background colored by its contribution (for widgets)."""
    docs = tables["documents"]
    d = docs.filter(pl.col("doc_id") == doc_id).row(0, named=True) if docs is not None else {"tokens": []}
    toks = tables["tokens"].filter((pl.col("step") == step) & (pl.col("query_id") == query_id)
                                   & (pl.col("doc_id") == doc_id))
    vals = dict(toks.select("position", "value").iter_rows())
    lim = max((abs(v) for v in vals.values()), default=1.0) or 1.0
    spans = []
    for pos, word in enumerate(d.get("tokens") or []):
        if word in ("<bos>", "<pad>"):
            continue
        v = vals.get(pos)
        if v is None:
            spans.append(html.escape(word))
            continue
        a = min(1.0, abs(v) / lim)
        rgb = "214,39,40" if v > 0 else "31,119,180"
        spans.append(f"<span title='{v:.4g}' style='background: rgba({rgb},{a:.2f}); padding: 0 2px'>"
                     f"{html.escape(word)}</span>")
    return " ".join(spans)


def correlation_figure(tables: dict, step: int | None = None, width: int = 620) -> go.Figure:
    """Pearson correlation between queries' score vectors over all documents, queries grouped by type
    (factual, then each reasoning task), with lines between the types."""
    step = nearest_step(_steps(tables), step)
    types = dict(query_types(tables["queries"]).iter_rows()) if tables.get("queries") is not None else {}
    ids = tables["scores"].filter(pl.col("step") == step)["query_id"].unique(maintain_order=True).to_list()
    order = sorted(ids, key=lambda q: (types.get(q, ""), q))
    mat, q_ids, _ = score_matrix(tables["scores"], step, query_ids=order)
    corr = cross_query_correlation(mat).tolist()
    labels = [f"{q} ({types.get(q, '')})" for q in q_ids]
    fig = go.Figure(go.Heatmap(z=corr, x=labels, y=labels, zmin=-1, zmax=1, colorscale="RdBu_r",
                               colorbar=dict(title="Pearson"),
                               hovertemplate="%{y}<br>%{x}<br>r = %{z:.3f}<extra></extra>"))
    bounds = [i for i in range(1, len(q_ids)) if types.get(q_ids[i]) != types.get(q_ids[i - 1])]
    shapes = []
    for b in bounds:
        shapes += [dict(type="line", x0=b - 0.5, x1=b - 0.5, y0=-0.5, y1=len(q_ids) - 0.5, line=dict(color="black")),
                   dict(type="line", y0=b - 0.5, y1=b - 0.5, x0=-0.5, x1=len(q_ids) - 0.5, line=dict(color="black"))]
    fig.update_yaxes(autorange="reversed", showticklabels=len(q_ids) <= 40)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(width=width, height=width - 40, shapes=shapes, margin=dict(t=50, l=10, r=10, b=10),
                      title=dict(text=f"cross-query correlation at step {step}", x=0.01))
    return fig


FINDINGS = (
    ("fact_in_top_k", "factual: a top-k document states the fact"),
    ("procedural_share", "reasoning: share of top k procedural, same task"),
    ("correlation", "mean cross-query correlation within type"),
    ("top_share_1", "share of positive influence in the top 1%"),
    ("powerlaw_slope", "power-law slope of sorted positive scores"),
)


def findings_figure(summary: pl.DataFrame, step: int | None = None, metrics: Sequence[tuple[str, str]] = FINDINGS,
                    width: int = 1000) -> go.Figure:
    """The studies' findings per query type over checkpoints (one panel per measure), the chosen step marked."""
    metrics = [(m, t) for m, t in metrics if m in summary.columns]
    if not metrics:
        raise InputError(f"the summary has none of the findings' columns; it has {summary.columns}")
    cols = min(3, len(metrics))
    n_rows = -(-len(metrics) // cols)
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[t for _, t in metrics], horizontal_spacing=0.07,
                        vertical_spacing=0.16)
    types = sorted(summary["type"].unique().to_list())
    in_legend: set[str] = set()
    for i, (m, _) in enumerate(metrics):
        r, c = i // cols + 1, i % cols + 1
        for j, t in enumerate(types):
            part = summary.filter((pl.col("type") == t) & pl.col(m).is_not_null()).sort("step")
            if part.is_empty():
                continue
            fig.add_trace(go.Scatter(x=part["step"].to_list(), y=part[m].to_list(), mode="lines+markers", name=t,
                                     legendgroup=t, showlegend=t not in in_legend, line=dict(color=color(t, j))),
                          row=r, col=c)
            in_legend.add(t)
        if step is not None:
            fig.add_vline(x=step, line=dict(color="gray", dash="dot"), row=r, col=c)
    fig.update_xaxes(title_text="step")
    fig.update_layout(width=width, height=300 * n_rows + 60, margin=dict(t=60, l=50, r=20, b=50),
                      legend=dict(orientation="h", x=0, y=-0.12),
                      title=dict(text=f"influence findings per query type, {ALL_STEPS} where influence was measured",
                                 x=0.01))
    return fig


def same_answer_figure(share: pl.DataFrame, width: int = 700) -> go.Figure:
    """Over checkpoints, the mean share of the queries' top and bottom documents that have the query's
    answer (:func:`~workbench.probes.influence.findings.same_answer_share`), beside the share among all
    documents."""
    means = share.group_by("step").agg(pl.col("top", "bottom", "chance").mean()).sort("step")
    k = int(share["k"].max())
    fig = go.Figure()
    for col, name, style in (("top", f"top {k} documents", dict(color="#d62728")),
                             ("bottom", f"bottom {k} documents", dict(color="#1f77b4")),
                             ("chance", "all documents", dict(color="gray", dash="dot"))):
        fig.add_trace(go.Scatter(x=means["step"].to_list(), y=means[col].to_list(), mode="lines+markers",
                                 name=name, line=style))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="share with the query's answer", rangemode="tozero")
    fig.update_layout(width=width, height=360, margin=dict(t=60, l=60, r=20, b=50),
                      title=dict(text="do held-out answers lean on training documents with the same answer? "
                                      f"<br><sup>{ALL_STEPS} where influence was measured</sup>", x=0.01))
    return fig


def _has_answers(tables: dict) -> bool:
    docs, queries = tables.get("documents"), tables.get("queries")
    return docs is not None and queries is not None and "answer" in docs.columns and "answer" in queries.columns


def report_section(tables: dict) -> Section:
    """The report's influence section, from :func:`~workbench.probes.influence.measurement.influence_tables`:
    the findings per query type (or the same-answer share) over checkpoints, the cross-query correlation on a
    checkpoint slider, and one query's top documents and their tokens."""
    steps = _steps(tables)
    sec = Section("Influence of training documents")
    sec.add("EK-FAC influence of every document on every query (Grosse et al., arXiv 2308.03296). Positive scores: up-weighting "
            "the document raises the probability of the query's completion. Per-token colors show which tokens "
            "of a document carry its influence (the position that predicts the token).")
    if tables["queries"] is not None and "kind" in tables["queries"].columns:
        k = 10
        summ = findings_summary(tables, k)
        last = summ.filter(pl.col("step") == steps[-1])
        parts = []
        for r in last.iter_rows(named=True):
            bits = [f"within-type correlation {r['correlation']:.2f}" if r.get("correlation") is not None else ""]
            if r.get("fact_in_top_k") is not None:
                bits.append(f"fact in top {k}: {r['fact_in_top_k']:.2f}")
            if r.get("procedural_share") is not None:
                bits.append(f"procedural share of top {k}: {r['procedural_share']:.2f}")
            parts.append(f"{r['type']} ({r['queries']} queries): " + ", ".join(b for b in bits if b))
        sec.add(f"At step {steps[-1]}: " + "; ".join(parts) + ".")
        sec.add(findings_figure(summ))
    elif _has_answers(tables):
        share = same_answer_share(tables, 10)
        means = share.group_by("step").agg(pl.col("top", "chance").mean()).sort("step")
        trend = ", ".join(f"{t:.2f} at step {s}" for s, t in means.select("step", "top").iter_rows())
        sec.add(f"Share of each held-out query's top 10 training documents that have its answer: {trend} "
                f"(among all documents: {means['chance'][0]:.2f}).")
        sec.add(same_answer_figure(share))
    sec.add(with_slider(lambda s: correlation_figure(tables, s), steps))
    queries = tables["queries"]
    pick = None
    if queries is not None and "kind" in queries.columns:
        reasoning = queries.filter(pl.col("kind") == "reasoning")["query_id"].to_list()
        pick = reasoning[0] if reasoning else None
    sec.add(with_slider(lambda s: top_documents_figure(tables, s, pick), steps))
    sec.add(with_slider(lambda s: token_figure(tables, s, pick), steps))
    return sec


__all__ = ["correlation_figure", "findings_figure", "query_label", "rank_label", "ranked_documents",
           "report_section", "same_answer_figure", "token_figure", "token_html", "top_documents_figure"]
