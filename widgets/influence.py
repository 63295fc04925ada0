"""InfluenceBrowser: pick a query and a checkpoint; see its top and bottom documents, the tokens inside them
that carry the influence, and the cross-query correlation heatmap."""

from __future__ import annotations

import ipywidgets as W

from workbench.probes.influence import figures as figs
from workbench.probes.influence.measurement import Influence, influence_tables
from workbench.runs import Run
from workbench.store import Store
from widgets.base import CheckpointView, require_probe


class InfluenceBrowser(CheckpointView):
    """A query menu and a checkpoint slider over the influence table of a store (or run).

    Panels: the query's top and bottom ``k`` documents with their scores; the per-token influence inside them
    (a heatmap, and below it the documents as text with each token shaded by its contribution: red raises the
    completion's probability, blue lowers it); the cross-query correlation matrix with queries grouped by type.
    """

    def __init__(self, source: Store | Run | str, query: str | None = None, step: int | None = None, k: int = 5,
                 width: int = 900):
        store = require_probe(source, Influence.name, "workbench measure RUN --probe influence --queries FILE, or "
                                                      "workbench.probes.influence.measurement.measure_influence")
        self.store, self.k = store, k
        self.tables = influence_tables(store)
        queries = self.tables["queries"]
        ids = queries["query_id"].to_list() if queries is not None else \
            self.tables["scores"]["query_id"].unique(maintain_order=True).to_list()
        labels = {}
        for r in (queries.iter_rows(named=True) if queries is not None else ({"query_id": q} for q in ids)):
            labels[r["query_id"]] = f"{r['query_id']} [{r.get('group', '')}] {figs.query_label(r, 60)}"
        self.query = query if query is not None else ids[0]
        self.menu = W.Dropdown(options=[(labels[q], q) for q in ids], value=self.query, description="query",
                               layout=W.Layout(width="95%"))
        panels = {
            "documents": lambda s: figs.top_documents_figure(self.tables, s, self.query, k, width=width),
            "tokens": lambda s: figs.token_figure(self.tables, s, self.query, k, width=width),
            "correlation": lambda s: figs.correlation_figure(self.tables, s),
        }
        steps = sorted(self.tables["scores"]["step"].unique().to_list())
        super().__init__(steps, panels, title=f"influence: {store.run or store.root}", step=step)
        self.text = W.HTML(self._text())
        self.children = (self.children[0], self.menu, *self.children[1:], self.text)
        self.menu.observe(self._on_query, names="value")
        self.slider.observe(lambda ch: setattr(self.text, "value", self._text()), names="value")

    def _text(self) -> str:
        ranked = figs.ranked_documents(self.tables, self.step, self.query, self.k)
        lines = []
        for r in ranked.iter_rows(named=True):
            rank = figs.rank_label(r["rank"])
            body = figs.token_html(self.tables, self.step, self.query, r["doc_id"])
            lines.append(f"<div style='margin:2px 0'><b>{rank}</b> <code>{r['doc_id']}</code> "
                         f"({r['value']:.3g}): {body}</div>")
        return "<div style='font-family:monospace;font-size:12px'>" + "".join(lines) + "</div>"

    def set_query(self, query_id: str) -> None:
        self.menu.value = query_id

    def _on_query(self, change) -> None:
        self.query = change["new"]
        for name in ("documents", "tokens"):
            self.rebuild(name)
        self.text.value = self._text()


__all__ = ["InfluenceBrowser"]
