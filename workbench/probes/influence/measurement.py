"""Influence of documents on queries at several checkpoints of a Run, into the run's store.

The :class:`Influence` measurement fits the curvature factors on the documents at each checkpoint, scores every
query against every document, and writes one Parquet part per checkpoint into ``run.store`` (table
``influence``), through :func:`workbench.measure` like every measurement (:func:`measure_influence` is a
shortcut): killed and started again, it resumes at the first checkpoint without a part, and refuses to resume
under other options. Rows of a part (key columns of
:mod:`workbench.store` plus ``query_id``, ``doc_id`` and ``position``):

- ``metric="score"``: one row per (query, document): ``value`` is the influence score (positive: up-weighting
  the document raises the completion's probability), ``group`` the query's group;
- ``metric="nll"``: one row per query: −log p(completion | prompt) at this checkpoint (for per-nat scores);
- ``metric="token_score"``: for the ``top_k_tokens`` highest and lowest scoring documents of each query, one
  row per document token: the contribution of the position that *predicts* that token (``position`` is the
  token's index in the document), so the tokens the model learns to produce carry the highlight. They sum
  to the document's score.

Beside the parts, ``documents.parquet`` and ``queries.parquet`` in the probe's folder hold the documents'
and queries' ids, groups, tokens (as text, when a tokenizer is given) and any extra columns passed in
``document_info`` / ``query_info`` (e.g. the built-in corpus's kind, task, entity), so views and reports
read everything from the store.

Every checkpoint must have the same architecture (model type and parameter shapes, recorded in
``architecture.json``): a series mixing architectures is refused with an error naming the step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from workbench.errors import InputError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, measure, setting
from workbench.probes.influence import figures
from workbench.probes.influence.fit import fit_factors
from workbench.probes.influence.lm import (
    LMTask,
    batches,
    check_vocabulary,
    completion_nll,
    lm_documents,
    model_context,
    model_vocab_size,
)
from workbench.gradients.moe import lm_modules
from workbench.probes.influence.scores import pairwise_scores
from workbench.gradients.tracking import resolve_modules
from workbench.runs import Run
from workbench.samples import IGNORE, SampleSet
from workbench.store import Store, write_json_atomic, write_parquet_atomic

MODULE_SETS = ("lm", "linear")


def _token_text(tokenizer, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    if hasattr(tokenizer, "tokens"):
        return tokenizer.tokens(ids)
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return list(tokenizer.convert_ids_to_tokens(list(ids)))
    return [tokenizer.decode([i]) for i in ids]


def _shown_ids(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """The tokens a view shows for a sample: its input, plus the last position's target when that is scored
    (a sample whose answer follows its input, as the built-in modular-addition samples), so that every
    scored position has a token to carry its contribution."""
    return list(x) + ([y[-1]] if y and y[-1] != IGNORE else [])


def _info_frame(samples: SampleSet, id_name: str, tokenizer, extra: pl.DataFrame | None) -> pl.DataFrame:
    df = pl.DataFrame({
        id_name: samples.ids, "group": samples.groups,
        "tokens": [_token_text(tokenizer, _shown_ids(x, y)) for x, y in zip(samples.input_ids, samples.targets)],
        "scored": [[t != IGNORE for t in y] for y in samples.targets],
    }, schema={id_name: pl.String, "group": pl.String, "tokens": pl.List(pl.String), "scored": pl.List(pl.Boolean)})
    if extra is not None:
        if id_name not in extra.columns:
            raise InputError(f"the extra {id_name.split('_')[0]} information needs an {id_name!r} column")
        df = df.join(extra.drop([c for c in ("group", "tokens", "scored") if c in extra.columns]), on=id_name,
                     how="left")
    return df


def architecture(model: torch.nn.Module) -> dict:
    """What must stay the same across a series: the model type and the shape of every parameter."""
    cfg = getattr(model, "config", None)
    return {"model_type": str(getattr(cfg, "model_type", type(model).__name__)),
            "parameters": {n: list(p.shape) for n, p in model.named_parameters()}}


def _same_architecture(first: dict, now: dict, step: int) -> None:
    if first["model_type"] == now["model_type"] and first["parameters"] == now["parameters"]:
        return
    if first["model_type"] != now["model_type"]:
        what = f"it is a {now['model_type']} model, the first a {first['model_type']} model"
    else:
        a, b = first["parameters"], now["parameters"]
        diff = sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k] != b.get(k))
        what = f"parameters differ, e.g. {diff[0]}: {a.get(diff[0])} vs {b.get(diff[0])}"
    raise InputError(
        f"the checkpoint at step {step} has another architecture than the one at step {first.get('step')} "
        f"({what}); influence over checkpoints follows one model as it trains: give a series of checkpoints of "
        "one architecture, or measure each series under its own name"
    )


@dataclass(frozen=True)
class Influence(Measurement):
    """Influence scores of ``documents`` on ``queries`` at each checkpoint (the module docstring has the rows).

    queries: (prompt, completion) samples (:func:`~workbench.probes.influence.lm.lm_queries`).
    documents: token sequences (every next token scored); default: the run's samples. Longer than the model's
        context they are cut with a warning (``truncate=False``: an error).
    modules: ``"lm"`` (MLP linear layers, MoE experts and routers: :func:`~.moe.lm_modules`) or ``"linear"``
        (every nn.Linear).
    strategy, fisher, damping, seed: as in :func:`fit_factors` / :func:`pairwise_scores`.
    top_k_tokens: per query, the per-token contributions of this many top and bottom documents are kept.
    batch_size: documents and queries per batch (the scores do not depend on it).
    tokenizer: turns token ids into text for the views (``tokens(ids)``, ``convert_ids_to_tokens`` or
        ``decode``); without it the views show ids.
    document_info, query_info: extra columns (joined on ``doc_id`` / ``query_id``) kept for the views.
    """

    name = "influence"
    view = "widgets.influence:InfluenceBrowser"
    section_order = 80

    queries: SampleSet | None = None
    documents: SampleSet | None = None
    strategy: str = "ekfac"
    fisher: str = "true"
    damping: float | None = None
    modules: str = "lm"
    top_k_tokens: int = 5
    truncate: bool = True
    seed: int = 0
    batch_size: int = setting(32)
    tokenizer: Any = setting(None)
    document_info: pl.DataFrame | None = setting(None)
    query_info: pl.DataFrame | None = setting(None)

    def __post_init__(self) -> None:
        if self.modules not in MODULE_SETS:
            raise InputError(f"modules must be one of {MODULE_SETS}, not {self.modules!r}")
        if self.top_k_tokens < 0:
            raise InputError(f"top_k_tokens must be >= 0, not {self.top_k_tokens}")
        if self.queries is None:
            raise InputError("influence needs queries: (prompt, completion) samples (lm_queries(...), or "
                             "--queries FILE on the command line)")
        for what in ("queries", "documents"):
            value = getattr(self, what)
            if value is not None and not isinstance(value, SampleSet):
                raise InputError("queries and documents must be SampleSets (lm_queries(...), lm_documents(...))")

    def settle(self, run: Run) -> "Influence":
        """The run's samples as documents when none were given."""
        return self if self.documents is not None else replace(self, documents=run.samples)

    def spec(self) -> None:
        return None  # fits and scores on the loaded model (ctx.model), no capture

    def begin(self, store: Store) -> None:
        folder = store.folder(self.name)  # during an overwrite, the new table's folder
        write_parquet_atomic(_info_frame(self.documents, "doc_id", self.tokenizer, self.document_info),
                             folder / "documents.parquet")
        write_parquet_atomic(_info_frame(self.queries, "query_id", self.tokenizer, self.query_info),
                             folder / "queries.parquet")

    def measure(self, cap: None, ctx: StepContext) -> pl.DataFrame:
        model = ctx.model
        arch_file = ctx.store.folder(self.name) / "architecture.json"
        arch = architecture(model) | {"step": ctx.step}
        if arch_file.exists():
            _same_architecture(json.loads(arch_file.read_text()), arch, ctx.step)
        else:
            write_json_atomic(arch, arch_file)
        docs = lm_documents(self.documents, n_ctx=model_context(model), vocab_size=model_vocab_size(model),
                            truncate=self.truncate)
        _check_queries(self.queries, model)
        doc_b, q_b = batches(docs, self.batch_size), batches(self.queries, self.batch_size)
        # lm_modules without documents: the fit finds and leaves out idle experts in its covariance pass
        tracked = lm_modules(model) if self.modules == "lm" else resolve_modules(model, None)
        return _one_checkpoint(model, tracked, LMTask(), docs, self.queries, doc_b, q_b, strategy=self.strategy,
                               fisher=self.fisher, damping=self.damping, seed=self.seed, top_k=self.top_k_tokens,
                               batch_size=self.batch_size, progress=ctx.progress)

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        tables = influence_tables(store)
        return None if tables["scores"].is_empty() else figures.report_section(tables)


def measure_influence(run: Run, queries: SampleSet, documents: SampleSet | None = None, *,
                      steps: Sequence[int] | None = None, device=None, overwrite: bool = False,
                      progress: bool = True, **options) -> Store:
    """:class:`Influence` over the checkpoints of ``run`` (or ``steps``) through :func:`workbench.measure`;
    ``options`` are the measurement's fields. Returns the run's store."""
    return measure(run, [Influence(queries=queries, documents=documents, **options)], steps=steps, device=device,
                   overwrite=overwrite, progress=progress)


def _check_queries(queries: SampleSet, model) -> None:
    vocab, n_ctx = model_vocab_size(model), model_context(model)
    if vocab is not None:
        check_vocabulary(queries, vocab, "query")
    if n_ctx is not None:
        long = [(sid, n) for sid, n in zip(queries.ids, queries.lengths) if n > n_ctx]
        if long:
            raise InputError(f"query {long[0][0]!r} has {long[0][1]} tokens, more than the model's context of "
                             f"{n_ctx}; shorten its prompt")
    if not all(any(t != -100 for t in y) for y in queries.targets):
        bad = next(sid for sid, y in zip(queries.ids, queries.targets) if all(t == -100 for t in y))
        raise InputError(f"query {bad!r} scores no token (an empty completion); give every query a completion")


def _one_checkpoint(model, tracked, task, docs, queries, doc_b, q_b, *, strategy, fisher, damping, seed, top_k,
                    batch_size, progress) -> pl.DataFrame:
    common = dict(loss_fn=task.loss, modules=tracked, mask_fn=task.mask)
    factors = fit_factors(model, doc_b, strategy=strategy, fisher=fisher, seed=seed, report=False,
                          progress=progress, **common)
    scores = pairwise_scores(model, factors, q_b, doc_b, measurement_fn=task.measurement, damping=damping,
                             progress=progress, **common)
    nll = completion_nll(model, queries, batch_size)
    q_ids, d_ids = queries.ids, docs.ids
    n_q, n_d = scores.shape
    parts = [
        pl.DataFrame({"metric": "score", "query_id": [q for q in q_ids for _ in range(n_d)],
                      "group": [g for g in queries.groups for _ in range(n_d)], "doc_id": d_ids * n_q,
                      "value": scores.double().flatten().numpy()}),
        pl.DataFrame({"metric": "nll", "query_id": q_ids, "group": queries.groups, "value": nll.double().numpy()}),
    ]
    if top_k > 0:
        parts.append(_token_scores(model, factors, task, docs, queries, scores, top_k, damping, tracked, progress))
    return pl.concat(parts, how="diagonal_relaxed").with_columns(pl.col("position").cast(pl.Int32))


def _token_scores(model, factors, task, docs, queries, scores, top_k, damping, tracked, progress) -> pl.DataFrame:
    """Per-token contributions of each query's top and bottom documents, one small pass per query (scoring
    every token of every document against every query would cost queries × tokens times more)."""
    k = min(top_k, scores.shape[1])
    rows = []
    for qi, qid in enumerate(queries.ids):
        picked = torch.cat([torch.topk(scores[qi], k).indices, torch.topk(-scores[qi], k).indices]).unique().tolist()
        sub = docs.select(picked)
        _, tokens = pairwise_scores(model, factors, batches(queries.select([qi])), batches(sub, len(picked)),
                                    loss_fn=task.loss, measurement_fn=task.measurement, mask_fn=task.mask,
                                    modules=tracked, damping=damping, per_token=True, progress=False)
        for j, di in enumerate(picked):
            # Position t predicts token t + 1: its contribution is shown on that token (position t + 1). The
            # last position predicts a token past the input only when its target is scored (see _shown_ids).
            n = len(_shown_ids(docs.input_ids[di], docs.targets[di])) - 1
            contrib = tokens[0, j, :n].double()
            rows.append(pl.DataFrame({"metric": "token_score", "query_id": qid, "group": queries.groups[qi],
                                      "doc_id": docs.ids[di], "position": list(range(1, n + 1)),
                                      "value": contrib.numpy()}))
    return pl.concat(rows) if rows else pl.DataFrame()


# --- reading back -------------------------------------------------------------------------------------------
def influence_tables(store: Store) -> dict[str, pl.DataFrame]:
    """The probe's scores (``scores``: step, query_id, doc_id, value), per-query NLL (``nll``), per-token
    contributions (``tokens``) and the documents' and queries' information (``documents``, ``queries``)."""
    if not Influence.measured(store):
        raise InputError(f"the store at {store.root} has no influence table; run measure_influence first")
    table = Influence.table(store)
    folder = Path(store.root) / Influence.name
    out = {
        "scores": table.filter(pl.col("metric") == "score").select("step", "group", "query_id", "doc_id", "value"),
        "nll": table.filter(pl.col("metric") == "nll").select("step", "group", "query_id", "value"),
        "tokens": table.filter(pl.col("metric") == "token_score").select("step", "query_id", "doc_id", "position",
                                                                         "value"),
    }
    for what in ("documents", "queries"):
        f = folder / f"{what}.parquet"
        out[what] = pl.read_parquet(f) if f.exists() else None
    return out


__all__ = ["Influence", "architecture", "influence_tables", "measure_influence"]
