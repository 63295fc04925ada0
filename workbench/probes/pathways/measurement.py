"""The ``pathways`` measurement: routing pathways of every sample at every checkpoint, into the store.

Per checkpoint (one part per step) it writes, per sample: the pathway's text form (column ``pathway`` on
the ``n_experts`` rows), consistency, consistency_raw, loss and accuracy; per group and for ``all``: the mean
pathway distance (``layer`` null) and per MoE layer (``layer`` = block index), the mean and the median
(``*_median``) of consistency and consistency_raw, loss, accuracy, the share of distinct pathways
(``unique_share``), and the number of pairs averaged (``n_pairs``).

Across checkpoints (``finalize``, the probe's ``final.parquet``): when each training sample was memorized
and each test sample generalized (``memorized_since`` / ``generalized_since`` per sample, ``eps`` and the
shares per group), the resulting groups ``<group>@<step>`` (the study's "Pretrain@t*" and "Test@t#") with
their distance, per-layer distance and consistency at every checkpoint (extra column ``since``), and the
Pearson and Spearman correlations of each group's distance and consistency with the accuracy of
``accuracy_group`` across checkpoints (``metric="correlation"``, extra columns ``of``, ``method``,
``window``: ``all`` checkpoints, or from the ``rise`` of that accuracy on), and the study's one-to-one
pairing of memorized-at with generalized-at groups (``metric="matched"`` and ``"matched_correlation"``, extra
column ``test_group``; see ``RoutingPathways._matched``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from workbench.capture import Capture, CaptureSpec
from workbench.errors import InputError, NotMoEError, UnknownArchitectureError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, setting
from workbench.probes.pathways import figures
from workbench.probes.pathways import functions as P
from workbench.runs import Run
from workbench.samples import per_group
from workbench.store import Store

SAMPLE_METRICS = ("loss", "accuracy", "consistency", "consistency_raw")
TRACKED = ("distance", "consistency", "consistency_raw", "consistency_median", "consistency_raw_median")


@dataclass(frozen=True)
class RoutingPathways(Measurement):
    """Pathway distance, consistency and memorized-at / generalized-at groups (docs/probes.md, "Routing
    pathways"; Li, Fan & Zhou, arXiv 2506.21551).

    tau: cumulative routing weight a layer's pathway must exceed (study: 0.7; also 0.5, 0.6, 0.8).
    unit: ``"char"`` (text form, the study's magnitudes) or ``"expert"`` ((layer, expert) symbols).
    routing_weights: ``"scores"`` (default: the model's own scores of all experts as a distribution, the SPEC's
        router softmax for softmax routers, the sigmoid scores normalized to sum 1 for sigmoid routers),
        ``"topk"`` (the weights the model applies to its selected experts, normalized per token to sum 1), or
        ``"softmax"`` (``"scores"``, for softmax routers only).
    max_pairs, seed: a group with more pairs is averaged over this many pairs drawn with ``seed``, the same
        pairs at every checkpoint. normalize: divide each distance by the longer pathway's length.
    per_sample: keep per-sample rows (needed for the memorized-at groups).
    test_groups: groups of held-out samples (generalized-at); every other group is training data
        (memorized-at). eps: loss threshold of memorized-at, or None to choose it per group so that a share in
        ``eps_target`` is memorized before the last checkpoint; delta: allowed distance from the final loss.
    accuracy_threshold, max_errors: generalized-at rule. accuracy_group: the group whose accuracy the
        metrics are correlated with (skipped when absent). min_group: smallest memorized-at group kept.

    Which consistency rises: on the built-in runs the group mean of either is dominated by samples whose
    largest adjacent cosine is near 0; the median ``consistency_raw`` rises while the model memorizes (and
    ``consistency`` = 1 - raw falls), and its direction during generalization differs between runs
    (notebooks/01_pathways.ipynb has the numbers).
    """

    name = "pathways"
    view = "widgets.pathways:PathwayView"
    in_demo = True
    section_order = 40

    tau: float = 0.7
    unit: str = "char"
    routing_weights: str = "scores"
    max_pairs: int | None = 200_000
    seed: int = 0
    normalize: bool = False
    per_sample: bool = True
    test_groups: tuple[str, ...] = ("test",)
    eps: float | None = None
    eps_target: tuple[float, float] = (0.20, 0.25)
    delta: float = 0.05
    accuracy_threshold: float = 0.8
    max_errors: int = 1
    accuracy_group: str = "test"
    min_group: int = 2
    backend: str = setting("auto")  # rapidfuzz or the torch dynamic program: the same integers

    def __post_init__(self) -> None:
        P.check_tau(self.tau)
        P.check_unit(self.unit)
        CaptureSpec(routing_weights=self.routing_weights)  # validates the choice
        if self.min_group < 2:
            raise InputError("min_group must be at least 2: a distance needs a pair")
        object.__setattr__(self, "test_groups", tuple(self.test_groups))  # frozen: lists become tuples
        object.__setattr__(self, "eps_target", tuple(self.eps_target))

    def spec(self) -> CaptureSpec:
        return CaptureSpec(routing=True, routing_weights=self.routing_weights)

    # --- one checkpoint ----------------------------------------------------------------------------------------
    def _group_rows(self, paths: P.Pathways, idx: torch.Tensor, moe_layers: list[int], texts: list[str]) -> list[dict]:
        pairs = P.sample_pairs(len(idx), self.max_pairs, self.seed)
        sub = paths.select(idx)
        kw = dict(normalize=self.normalize, backend=self.backend)
        dist = P.pairwise_distances(sub, self.unit, pairs.to(sub.device), **kw).double().mean()
        per_layer = P.layer_distances(sub, self.unit, pairs.to(sub.device), **kw).double().mean(1)
        rows = [{"metric": "distance", "value": float(dist)},
                {"metric": "n_pairs", "value": float(len(pairs))},
                {"metric": "unique_share", "value": len({texts[i] for i in idx.tolist()}) / len(idx)}]
        rows += [{"metric": "distance", "layer": layer, "value": float(v)} for layer, v in zip(moe_layers, per_layer)]
        return rows

    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        if cap.routing is None or cap.routing.shape[1] == 0:
            raise NotMoEError("the capture holds no routing; the pathways measurement needs an MoE model")
        if cap.router_matrices is None and cap.routing.shape[1] >= 2:
            raise UnknownArchitectureError(f"pathway consistency needs each layer's router matrix: "
                                           f"{cap.no_router_matrices}")
        paths = P.pathways(cap.routing, self.tau)
        texts = paths.texts()
        n_layers = cap.routing.shape[1]
        if n_layers >= 2:
            cons = P.consistency(cap.routing, cap.router_matrices)  # warns (once) when there are only two
        else:  # one MoE layer: no adjacent pair to compare
            nan = torch.full((len(cap),), math.nan)
            cons = {"consistency": nan, "consistency_raw": nan}
        per_sample = {"loss": cap.loss, "accuracy": cap.accuracy, **cons}
        groups = per_group(cap.groups)
        small = [g for g, idx in groups if len(idx) < 2]
        if small:
            raise InputError(
                f"group(s) {small} have fewer than 2 samples, so they have no pair to measure a pathway distance "
                "on; give each group at least 2 samples or merge them"
            )
        rows = []
        for g, idx in groups:
            for r in self._group_rows(paths, idx, cap.moe_layers, texts):
                rows.append({"group": g, **r})
            for metric, v in per_sample.items():
                vals = v[idx].double()
                vals = vals[~torch.isnan(vals)]
                rows.append({"group": g, "metric": metric, "value": float(vals.mean()) if len(vals) else math.nan})
                if metric.startswith("consistency"):
                    # mean/max of cosines explodes for samples whose largest cosine is near 0: a median too
                    rows.append({"group": g, "metric": f"{metric}_median",
                                 "value": float(vals.quantile(0.5)) if len(vals) else math.nan})
        parts = [pl.DataFrame(rows, schema={"group": pl.String, "metric": pl.String, "layer": pl.Int32,
                                            "value": pl.Float64})]
        if self.per_sample:
            wide = pl.DataFrame({"sample_id": cap.sample_ids, "group": cap.groups}
                                | {k: v.double().numpy() for k, v in per_sample.items()})
            parts.append(wide.unpivot(index=["sample_id", "group"], variable_name="metric", value_name="value"))
            parts.append(pl.DataFrame({
                "sample_id": cap.sample_ids, "group": cap.groups, "metric": "n_experts",
                "value": paths.lengths.sum(1).double().cpu().numpy(), "pathway": texts,
            }))
        return pl.concat(parts, how="diagonal_relaxed")

    # --- across checkpoints ----------------------------------------------------------------------------------
    def finalize(self, store: Store, run: Run) -> pl.DataFrame | None:
        tab = self.table(store)
        if tab.is_empty():
            return None
        steps = sorted(tab["step"].unique().to_list())
        means = tab.filter(pl.col("sample_id").is_null())
        layers = sorted(means.filter(pl.col("metric") == "distance")["layer"].drop_nulls().unique().to_list())
        out = [self._correlations(means, steps)]
        if self.per_sample and len(steps) >= 2 and "pathway" in tab.columns:
            out += self._since_groups(tab.filter(pl.col("sample_id").is_not_null()), steps, layers)
        out = [d for d in out if d is not None and not d.is_empty()]
        return pl.concat(out, how="diagonal_relaxed") if out else None

    def _correlations(self, means: pl.DataFrame, steps: list[int]) -> pl.DataFrame | None:
        if self.accuracy_group not in means["group"].unique().to_list():
            return None
        acc = series(means, "accuracy", self.accuracy_group, steps)
        rows = []
        for g in means["group"].unique(maintain_order=True).to_list():
            rows += correlation_rows(means, g, acc, steps, {"group": g, "metric": "correlation"})
        return pl.DataFrame(rows)

    def _since_groups(self, ps: pl.DataFrame, steps: list[int], layers: list[int]) -> list[pl.DataFrame]:
        def wide(metric: str) -> pl.DataFrame:
            return (ps.filter(pl.col("metric") == metric)
                    .pivot(on="step", index=["sample_id", "group"], values="value", sort_columns=True)
                    .sort("sample_id"))

        cols = [str(s) for s in steps]
        loss, acc = wide("loss"), wide("accuracy")
        texts = {s: dict(d.select("sample_id", "pathway").iter_rows())
                 for (s,), d in ps.filter(pl.col("metric") == "n_experts").group_by("step")}
        paths_at = {s: P.Pathways.from_lists([P.parse_pathway(t) for t in texts[s].values()]) for s in steps}
        position = {s: {sid: i for i, sid in enumerate(texts[s])} for s in steps}
        cons = {m: ps.filter(pl.col("metric") == m).select("step", "sample_id", "value") for m in SAMPLE_METRICS}
        out_samples, out_groups, out_curves, jobs = [], [], [], []
        last = steps[-1]
        for g in loss["group"].unique(maintain_order=True).to_list():
            is_test = g in self.test_groups
            table = (acc if is_test else loss).filter(pl.col("group") == g)
            values = table.select(cols).to_numpy().T  # [T, n]
            ids = table["sample_id"].to_list()
            keep = ~np.isnan(values).any(0)
            values, ids = values[:, keep], [i for i, k in zip(ids, keep) if k]
            if not ids:
                continue
            if is_test:
                since = P.generalized_since(values, steps, self.accuracy_threshold, self.max_errors)
                kind, eps = "generalized_since", None
            else:
                eps = self.eps if self.eps is not None else P.choose_eps(values, steps, self.eps_target, self.delta)
                since = (P.memorized_since(values, steps, eps, self.delta) if not math.isnan(eps)
                         else torch.full((len(ids),), -1))
                kind = "memorized_since"
            since = since.tolist()
            out_samples.append(pl.DataFrame({
                "sample_id": ids, "group": g, "metric": kind,
                "value": [float(s) if s >= 0 else math.nan for s in since],
            }))
            share = sum(0 <= s < last for s in since) / len(since)
            summary = [{"group": g, "metric": f"share_{kind.split('_')[0]}", "value": share}]
            if eps is not None:
                summary.append({"group": g, "metric": "eps", "value": float(eps)})
            out_groups.append(pl.DataFrame(summary))
            for t in sorted({s for s in since if 0 <= s < last}):  # settled only at the end: nothing to follow
                members = [i for i, s in zip(ids, since) if s == t]
                if len(members) >= self.min_group:
                    jobs.append((f"{g}@{t}", t, members, is_test))
        for name, t, members, _ in tqdm(jobs, desc="pathways: memorized-at groups", leave=False,
                                        disable=len(jobs) < 2):
            out_curves.append(self._curves(name, t, members, steps, paths_at, position, cons, layers))
        matched = self._matched(jobs, out_curves, paths_at[last], position[last], steps)
        return out_samples + out_groups + out_curves + ([matched] if matched is not None else [])

    def _matched(self, jobs, curves, last_paths, last_position, steps) -> pl.DataFrame | None:
        """The study's pairing of "Pretrain@t*" with "Test@t#" groups: a one-to-one matching by the cosine
        similarity of the groups' mean embeddings (``metric="matched"``, the similarity, with the paired
        ``test_group``), and each training group's metrics correlated with the accuracy of its own test group
        (``metric="matched_correlation"``). The embedding is the multi-hot pathway at the last checkpoint
        (:func:`~workbench.probes.pathways.pathway_embedding`): the study matched on text embeddings, but the
        routing is the representation this measurement has of every sample, with no encoder to choose."""
        train = [(name, members) for name, _, members, is_test in jobs if not is_test]
        test = [(name, members) for name, _, members, is_test in jobs if is_test]
        if not train or not test:
            return None
        emb = P.pathway_embedding(last_paths)

        def means(groups):
            return torch.stack([emb[torch.tensor([last_position[m] for m in members])].mean(0) for _, members in groups])

        curve = pl.concat(curves, how="diagonal_relaxed")
        rows = []
        for i, j, sim in zip(*(t.tolist() for t in P.match_groups(means(train), means(test)))):
            tr, te = train[i][0], test[j][0]
            rows.append({"group": tr, "metric": "matched", "test_group": te, "value": sim})
            acc = series(curve, "accuracy", te, steps)
            rows += correlation_rows(curve, tr, acc, steps,
                                     {"group": tr, "metric": "matched_correlation", "test_group": te})
        return pl.DataFrame(rows)

    def _curves(self, name, since, members, steps, paths_at, position, cons, layers) -> pl.DataFrame:
        rows = []
        pairs = P.sample_pairs(len(members), self.max_pairs, self.seed)
        kw = dict(normalize=self.normalize, backend=self.backend)
        member_set = set(members)
        for s in steps:
            idx = torch.tensor([position[s][m] for m in members])
            sub = paths_at[s].select(idx)
            d = float(P.pairwise_distances(sub, self.unit, pairs, **kw).double().mean())
            per_layer = P.layer_distances(sub, self.unit, pairs, **kw).double().mean(1).tolist()
            rows.append({"step": s, "metric": "distance", "value": d})
            rows += [{"step": s, "metric": "distance", "layer": layer, "value": v} for layer, v in zip(layers, per_layer)]
        for m, d in cons.items():
            v = pl.col("value").fill_nan(None)
            agg = (d.filter(pl.col("sample_id").is_in(member_set)).group_by("step", maintain_order=True)
                   .agg(v.mean().alias("mean"), v.median().alias("median")))
            for s, mean, median in agg.iter_rows():
                rows.append({"step": s, "metric": m, "value": mean})
                if m.startswith("consistency"):
                    rows.append({"step": s, "metric": f"{m}_median", "value": median})
        rows.append({"metric": "n_samples", "value": float(len(members))})
        df = pl.DataFrame(rows, schema={"step": pl.Int64, "metric": pl.String, "layer": pl.Int32,
                                        "value": pl.Float64})
        return df.with_columns(group=pl.lit(name), since=pl.lit(since, dtype=pl.Int64))

    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        return figures.report_section(cls.table(store), cls.table(store, final=True), store.options(cls.name) or {})


def correlation_rows(means: pl.DataFrame, group: str, acc: np.ndarray, steps: list[int], keys: dict) -> list[dict]:
    """Rows of the Pearson and Spearman correlations of each tracked metric of ``group`` with ``acc`` across
    checkpoints, over all checkpoints and from the rise of ``acc`` on (NaN where undefined)."""
    windows = {"all": np.ones(len(steps), dtype=bool), "rise": rise_mask(acc)}
    rows = []
    for of in TRACKED:
        x = series(means, of, group, steps)
        for window, keep in windows.items():
            for method in ("pearson", "spearman"):
                try:
                    r = P.track_correlation(x[keep], acc[keep], method)
                except InputError:
                    r = math.nan
                rows.append({**keys, "of": of, "method": method, "window": window, "value": r})
    return rows


def series(means: pl.DataFrame, metric: str, group: str, steps: list[int]) -> np.ndarray:
    """A group's per-checkpoint value of a metric (global, not per layer) in step order; NaN where missing."""
    d = means.filter((pl.col("metric") == metric) & (pl.col("group") == group) & pl.col("layer").is_null())
    by_step = dict(d.select("step", "value").iter_rows())
    return np.array([by_step.get(s, math.nan) for s in steps], dtype=np.float64)


def rise_mask(acc: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Checkpoints from the rise of an accuracy curve on: from the last checkpoint before the best one whose
    accuracy is at most min + ``frac`` x (max - min); all checkpoints when there is none."""
    keep = np.zeros(len(acc), dtype=bool)
    if not np.isfinite(acc).any():
        return keep
    lo, hi = np.nanmin(acc), np.nanmax(acc)
    best = int(np.nanargmax(acc))
    low = np.flatnonzero(acc[:best] <= lo + frac * (hi - lo))
    keep[int(low[-1]) if len(low) else 0:] = True
    return keep


__all__ = ["RoutingPathways", "correlation_rows", "rise_mask", "series"]
