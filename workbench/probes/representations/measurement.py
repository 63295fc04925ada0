"""The ``representations`` measurement: how the hidden states of the samples are organized at every checkpoint,
and 2-D layouts of them aligned across checkpoints.

Per checkpoint (one part per step), from the hidden state after each block in ``layers`` (the last token's, or
the mean over tokens):

- per sample and block: ``purity`` (the share of its ``k`` nearest neighbours with its label) and
  ``silhouette``; per sample (``layer`` null): ``accuracy`` (the model's) and ``label``;
- per group (and ``all``) and block: the means of ``purity`` and ``silhouette``, and ``purity_chance`` (the
  purity of neighbours drawn at random); per group: ``accuracy`` and ``loss``;
- with cyclic labels (``period``, the built-in modular-addition runs' p): per group and block the share of the
  label means' variance at each frequency (``fourier_power``, extra column ``frequency``), the strongest
  frequency's share (``fourier_top_share``), the number of frequencies the variance is spread over
  (``fourier_frequencies``, 1 / Σ share²), and both with the labels' order shuffled (``*_shuffled``, their
  chance level).

At the checkpoints it lays out (``embed_steps``), for the blocks ``embed_layers``, it writes each sample's first
two principal coordinates (``metric="pca"``, extra columns ``x``, ``y``; with ``method="umap"`` it keeps the
states beside the parts instead), and across checkpoints (``final.parquet``) writes the aligned 2-D layout (``metric="embedding"``, extra columns
``x``, ``y``, ``label``, ``correct``, ``text``; ``value`` is the sample's purity there), the layout's
``angle_agreement`` with cyclic labels (extra column ``frequency``), and the Pearson and Spearman correlations of
each group's purity with the accuracy of ``accuracy_group`` across checkpoints (``metric="correlation"``, extra
columns ``of``, ``method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import torch

from workbench.capture import Capture, CaptureSpec
from workbench.errors import InputError, StoreError
from workbench.figures import Section
from workbench.measure import Measurement, StepContext, setting
from workbench.probes.representations import figures
from workbench.probes.representations import functions as R
from workbench.runs import Run, count_blocks, spread_steps
from workbench.samples import OVERALL, SampleSet, answer_tokens, per_group
from workbench.stats import correlation
from workbench.store import Store, write_parquet_atomic

LABELS = ("answer", "group")
METHODS = ("pca", "umap", "none")


def sample_texts(run: Run, samples: SampleSet, width: int = 60) -> list[str]:
    """Each sample's text for hover labels, at most ``width`` characters: decoded with the run's tokenizer when it
    has one, else the sample's id (the built-in runs' ids are their text: ``3+5``)."""
    if run.checkpoints[0].kind in ("hf", "hub"):
        try:
            tok = run.tokenizer()
            texts = [tok.decode(x) for x in samples.input_ids]
            return [t if len(t) <= width else "…" + t[-width + 1:] for t in texts]  # the end leads to the answer
        except (OSError, ValueError, TypeError):
            pass  # no tokenizer saved with the checkpoints: the ids
    return list(samples.ids)


@dataclass(frozen=True)
class Representations(Measurement):
    """Neighbourhood purity, silhouette and (cyclic labels) Fourier structure of the hidden states, and their
    2-D layouts aligned across checkpoints (docs/probes.md, "Representations").

    layers: blocks whose output state is measured (default: every block, settled from the run).
    label: ``"answer"`` (each sample's last scored target: the sum of a modular-addition pair) or ``"group"``.
    k, metric: neighbours per sample and the distance (``"euclidean"`` or ``"cosine"``) for purity; the
        silhouette uses the same distance. reduce: ``"last"`` token's state or the ``"mean"`` over tokens.
    period: the labels are cyclic with this period (0: they are not); default: p for the built-in modular-
        addition runs, else 0.
    method: ``"pca"`` (per checkpoint, Procrustes-aligned; fast, the default), ``"umap"`` (umap-learn's
        AlignedUMAP: neighbourhoods kept, seconds to compile and fit; the ``umap`` extra) or ``"none"``.
    embed_layers: blocks laid out in 2-D (default: every one of ``layers`` with PCA, the last with UMAP). embed_steps: checkpoints laid out
        (default: at most ``max_embedded`` spread over the run). n_neighbors, min_dist,
        alignment_regularisation: AlignedUMAP's. seed: the layout's and the shuffled spectrum's.
    accuracy_group: the group whose accuracy purity is correlated with across checkpoints.
    """

    name = "representations"
    view = "widgets.representations:RepresentationView"
    in_demo = True
    section_order = 65

    layers: tuple[int, ...] | None = None
    label: str = "answer"
    k: int = R.DEFAULT_K
    metric: str = "euclidean"
    reduce: str = "last"
    period: int | None = None
    method: str = "pca"
    embed_layers: tuple[int, ...] | None = None
    embed_steps: tuple[int, ...] | None = None
    max_embedded: int = 12
    n_neighbors: int = 15
    min_dist: float = 0.1
    alignment_regularisation: float = 1e-2
    seed: int = 0
    accuracy_group: str = "test"
    block: int = setting(2048)

    def __post_init__(self) -> None:
        for name in ("layers", "embed_layers", "embed_steps"):
            value = getattr(self, name)
            if value is not None:  # frozen: lists become tuples
                object.__setattr__(self, name, tuple(int(v) for v in ([value] if isinstance(value, int) else value)))
        if self.label not in LABELS:
            raise InputError(f"label must be one of {LABELS}, not {self.label!r}")
        if self.metric not in R.METRICS:
            raise InputError(f"metric must be one of {R.METRICS}, not {self.metric!r}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.k < 1:
            raise InputError(f"k must be at least 1, not {self.k}")
        CaptureSpec(hidden_reduce=self.reduce)  # validates the choice

    def settle(self, run: Run) -> "Representations":
        """Every block, the last one laid out, the built-in runs' period, and the embedded checkpoints."""
        wanted = (self.layers or ()) + (self.embed_layers or ())
        n = count_blocks(run) if self.layers is None or any(v < 0 for v in wanted) else None
        layers = tuple(sorted({v % n if n else v for v in self.layers})) if self.layers is not None \
            else tuple(range(n))
        # PCA layouts are computed per checkpoint and cost little: every block. UMAP needs every embedded
        # checkpoint's states kept until the end: the last block only, unless asked.
        embed_layers = tuple(sorted({v % n if n else v for v in self.embed_layers})) \
            if self.embed_layers is not None else layers if self.method == "pca" else layers[-1:]
        missing = sorted(set(embed_layers) - set(layers))
        if missing:
            raise InputError(f"embed_layers {missing} are not among the measured layers {list(layers)}")
        period = self.period
        if period is None:
            info = run.info or {}
            period = int(info.get("training", {}).get("p", 0)) if info.get("task") == "modular_addition" else 0
        steps = self.embed_steps if self.embed_steps is not None else spread_steps(run.steps, self.max_embedded)
        return replace(self, layers=layers, embed_layers=embed_layers, period=period, embed_steps=steps)

    def spec(self) -> CaptureSpec:
        if self.layers is None:
            raise InputError("the representations measurement does not know its layers yet: give layers=, or settle "
                             "it on a run (settle(run), which workbench.measure calls)")
        return CaptureSpec(hidden_layers=self.layers, hidden_reduce=self.reduce)

    # --- the states kept for the layouts -------------------------------------------------------------------------
    def states_dir(self, store: Store):
        return store.root / self.name / "states"

    def begin(self, store: Store) -> None:
        """Forget kept states of checkpoints without a part (from a killed or an overwritten measurement)."""
        folder = self.states_dir(store)
        if folder.exists():
            for f in folder.glob("step_*.parquet"):
                if not store.has(self.name, int(f.stem.split("_")[1])):
                    f.unlink()

    def labels(self, samples: SampleSet) -> torch.Tensor:
        if self.label == "answer":
            return answer_tokens(samples.targets)
        names = {g: i for i, g in enumerate(samples.group_names)}
        return torch.tensor([names[g] for g in samples.groups], dtype=torch.long)

    # --- one checkpoint ------------------------------------------------------------------------------------------
    def measure(self, cap: Capture, ctx: StepContext) -> pl.DataFrame:
        layers = [v for v in self.layers if v in cap.hidden]
        if not layers:
            raise InputError(f"the capture holds no hidden states of blocks {list(self.layers)}; measure with this "
                             "measurement's spec() (workbench.measure does)")
        labels = self.labels(ctx.samples)
        keep = labels >= 0
        if int(keep.sum()) < 2:
            raise InputError("fewer than two samples have a scored position, so they have no answer to group by")
        idx = keep.nonzero().flatten()
        ids = [cap.sample_ids[i] for i in idx.tolist()]
        groups = [cap.groups[i] for i in idx.tolist()]
        y = labels[idx]
        rows: list[pl.DataFrame] = []
        chance = R.purity_chance(y)
        for layer in layers:
            x = cap.hidden[layer][idx].float()
            purity = R.neighbour_purity(x, y, self.k, self.metric, self.block)
            sil = R.silhouette(x, y, self.metric, self.block) if len(torch.unique(y)) > 1 \
                else torch.full((len(y),), math.nan, dtype=torch.float64)
            rows.append(pl.DataFrame({"sample_id": ids, "group": groups, "layer": layer, "metric": "purity",
                                      "value": purity.cpu().numpy()}))
            rows.append(pl.DataFrame({"sample_id": ids, "group": groups, "layer": layer, "metric": "silhouette",
                                      "value": sil.cpu().numpy()}))
            group_rows = []
            for g, gi in per_group(groups):
                group_rows += [{"group": g, "layer": layer, "metric": m, "value": float(v[gi].mean())}
                               for m, v in (("purity", purity), ("silhouette", sil), ("purity_chance", chance))]
                if self.period and self.label == "answer":
                    group_rows += self._fourier_rows(x[gi], y[gi], g, layer)
            rows.append(pl.DataFrame(group_rows, schema={"group": pl.String, "layer": pl.Int32, "metric": pl.String,
                                                          "value": pl.Float64, "frequency": pl.Int32}))
        acc = cap.accuracy[idx].double()
        rows.append(pl.DataFrame({"sample_id": ids, "group": groups, "metric": "accuracy", "value": acc.numpy()}))
        rows.append(pl.DataFrame({"sample_id": ids, "group": groups, "metric": "label",
                                  "value": y.double().numpy()}))
        loss = cap.loss[idx].double()
        rows.append(pl.DataFrame([{"group": g, "metric": m, "value": float(v[gi][~torch.isnan(v[gi])].mean())}
                                  for g, gi in per_group(groups) for m, v in (("accuracy", acc), ("loss", loss))]))
        if self.method != "none" and self.embed_steps and ctx.step in self.embed_steps:
            if self.method == "pca":  # each checkpoint's principal plane now; only the turn between them at the end
                for layer in self.embed_layers:
                    xy = R.pca_coordinates(cap.hidden[layer][idx].float()).float().numpy()
                    rows.append(pl.DataFrame({"sample_id": ids, "group": groups, "layer": layer, "metric": "pca",
                                              "x": xy[:, 0], "y": xy[:, 1], "value": 0.0}))
            else:
                self._keep_states(ctx.store, ctx.step, cap, idx, ids)
        return pl.concat(rows, how="diagonal_relaxed")

    def _fourier_rows(self, x: torch.Tensor, y: torch.Tensor, group: str, layer: int) -> list[dict]:
        present = torch.bincount(y, minlength=self.period)[: self.period] > 0
        if y.max() >= self.period or not bool(present.all()):
            return []  # the group misses some labels: no spectrum along them
        spectrum = R.fourier_spectrum(x, y, self.period)
        shuffled = R.shuffled_spectra(x, y, self.period, seed=self.seed)
        base = {"group": group, "layer": layer}
        rows = [base | {"metric": "fourier_power", "frequency": f + 1, "value": float(v)}
                for f, v in enumerate(spectrum.tolist())]
        rows += [base | {"metric": "fourier_top_share", "value": R.top_share(spectrum)},
                 base | {"metric": "fourier_frequencies", "value": R.effective_frequencies(spectrum)},
                 base | {"metric": "fourier_top_share_shuffled",
                         "value": float(torch.stack([torch.tensor(R.top_share(s)) for s in shuffled]).mean())},
                 base | {"metric": "fourier_frequencies_shuffled",
                         "value": float((1 / shuffled.square().sum(-1)).mean())}]
        return rows

    def _keep_states(self, store: Store, step: int, cap: Capture, idx: torch.Tensor, ids: list[str]) -> None:
        parts = [pl.DataFrame({"sample_id": ids, "layer": layer,
                               "state": cap.hidden[layer][idx].float().numpy()})
                 for layer in self.embed_layers if layer in cap.hidden]
        if parts:
            write_parquet_atomic(pl.concat(parts), self.states_dir(store) / f"step_{step:06d}.parquet")

    # --- across checkpoints ----------------------------------------------------------------------------------
    def finalize(self, store: Store, run: Run) -> pl.DataFrame | None:
        table = self.table(store)
        if table.is_empty():
            return None
        out = [self._correlations(table)]
        if self.method != "none":
            out.append(self._layouts(store, run, table))
        out = [d for d in out if d is not None and not d.is_empty()]
        return pl.concat(out, how="diagonal_relaxed") if out else None

    def kept_states(self, store: Store) -> dict[int, pl.DataFrame]:
        """The states kept for the layouts, by step (steps with a part only)."""
        folder = self.states_dir(store)
        found = sorted(folder.glob("step_*.parquet")) if folder.exists() else []
        return {int(f.stem.split("_")[1]): pl.read_parquet(f) for f in found
                if store.has(self.name, int(f.stem.split("_")[1]))}

    def _pca_layouts(self, table: pl.DataFrame) -> dict[int, tuple[list[int], list[str], list[torch.Tensor]]]:
        """Per block: the embedded steps, the sample ids, and the principal coordinates turned into one chain."""
        pca = table.filter(pl.col("metric") == "pca")
        out = {}
        for layer in sorted(pca["layer"].unique().to_list()):
            d = pca.filter(pl.col("layer") == layer).sort("step", "sample_id")
            steps = sorted(d["step"].unique().to_list())
            frames = [d.filter(pl.col("step") == s) for s in steps]
            ids = frames[0]["sample_id"].to_list()
            if any(f["sample_id"].to_list() != ids for f in frames):
                raise StoreError("the stored principal coordinates hold different samples at different steps; "
                                 "measure again with overwrite=True")
            coords = [torch.from_numpy(np.stack([f["x"].to_numpy(), f["y"].to_numpy()], 1)) for f in frames]
            out[layer] = (steps, ids, R.align_chain(coords))
        return out

    def _umap_layouts(self, store: Store) -> dict[int, tuple[list[int], list[str], list[torch.Tensor]]]:
        """Per block: the embedded steps, the sample ids, and the AlignedUMAP layout of the kept states."""
        kept = self.kept_states(store)
        if not kept:
            return {}
        steps = sorted(kept)
        out = {}
        for layer in self.embed_layers:
            frames = [kept[s].filter(pl.col("layer") == layer) for s in steps]
            ids = frames[0]["sample_id"].to_list()
            if any(f["sample_id"].to_list() != ids for f in frames):
                raise StoreError(f"the states kept in {self.states_dir(store)} hold different samples at different "
                                 "steps; measure again with overwrite=True")
            if not ids:
                continue
            states = [torch.from_numpy(f["state"].to_numpy().astype(np.float32)) for f in frames]
            out[layer] = (steps, ids, R.aligned_umap(states, n_neighbors=self.n_neighbors, min_dist=self.min_dist,
                                                     alignment_regularisation=self.alignment_regularisation,
                                                     metric=self.metric, seed=self.seed))
        return out

    def _layouts(self, store: Store, run: Run, table: pl.DataFrame) -> pl.DataFrame | None:
        layouts = self._pca_layouts(table) if self.method == "pca" else self._umap_layouts(store)
        if not layouts:
            return None
        per_sample = table.filter(pl.col("sample_id").is_not_null())
        purity = per_sample.filter(pl.col("metric") == "purity").select("step", "layer", "sample_id", "value")
        accuracy = per_sample.filter(pl.col("metric") == "accuracy").select(
            "step", "sample_id", correct=pl.col("value") >= 1 - 1e-9)
        labels = per_sample.filter(pl.col("metric") == "label").select("step", "sample_id",
                                                                        label=pl.col("value").cast(pl.Int64))
        group_of = dict(per_sample.filter(pl.col("metric") == "label").select("sample_id", "group").unique().iter_rows())
        try:
            texts = dict(zip(run.samples.ids, sample_texts(run, run.samples)))
        except InputError:  # measured on samples given to measure(), which the run does not keep
            texts = {}
        out = []
        for layer, (steps, ids, xy) in layouts.items():
            for step, coords in zip(steps, xy):
                out.append(pl.DataFrame({"step": step, "layer": layer, "sample_id": ids, "metric": "embedding",
                                         "x": coords[:, 0].numpy(), "y": coords[:, 1].numpy(),
                                         "group": [group_of.get(i) for i in ids],
                                         "text": [texts.get(i, "") for i in ids]}))
        if not out:
            return None
        emb = (pl.concat(out)
               .join(purity, on=["step", "layer", "sample_id"], how="left")
               .join(accuracy, on=["step", "sample_id"], how="left")
               .join(labels, on=["step", "sample_id"], how="left"))
        parts = [emb]
        if self.period and self.label == "answer":
            parts.append(self._angle_rows(emb))
        return pl.concat(parts, how="diagonal_relaxed")

    def _angle_rows(self, emb: pl.DataFrame) -> pl.DataFrame:
        rows = []
        for (step, layer, group), d in emb.group_by(["step", "layer", "group"], maintain_order=True):
            rows += self._angle(d, step, layer, group)
        for (step, layer), d in emb.group_by(["step", "layer"], maintain_order=True):
            rows += self._angle(d, step, layer, OVERALL)
        return pl.DataFrame(rows, schema={"step": pl.Int64, "layer": pl.Int32, "group": pl.String,
                                          "metric": pl.String, "value": pl.Float64, "frequency": pl.Int32})

    def _angle(self, d: pl.DataFrame, step: int, layer: int, group: str) -> list[dict]:
        y = torch.tensor(d["label"].to_list())
        if y.numel() < 2 or int(y.max()) >= self.period or int(y.min()) < 0:
            return []
        xy = torch.tensor(np.stack([d["x"].to_numpy(), d["y"].to_numpy()], 1))
        r, k = R.angle_agreement(xy, y, self.period)
        return [{"step": step, "layer": layer, "group": group, "metric": "angle_agreement", "value": r,
                 "frequency": k}]

    def _correlations(self, table: pl.DataFrame) -> pl.DataFrame | None:
        means = table.filter(pl.col("sample_id").is_null())
        acc = means.filter((pl.col("metric") == "accuracy") & (pl.col("group") == self.accuracy_group)
                           & pl.col("layer").is_null()).select("step", acc="value")
        if acc.height < 3:
            return None
        rows = []
        for metric in ("purity", "fourier_frequencies"):
            d = means.filter(pl.col("metric") == metric).join(acc, on="step")
            for (group, layer), gd in d.group_by(["group", "layer"], maintain_order=True):
                gd = gd.sort("step")
                for method in ("pearson", "spearman"):
                    try:
                        r, _ = correlation(gd["value"].to_numpy(), gd["acc"].to_numpy(), method)
                    except InputError:
                        continue
                    rows.append({"group": group, "layer": layer, "metric": "correlation", "of": metric,
                                 "method": method, "value": r})
        return pl.DataFrame(rows) if rows else None

    # --- reading back --------------------------------------------------------------------------------------------
    @classmethod
    def section(cls, store: Store, run: Run | None = None) -> Section | None:
        if not cls.measured(store):
            return None
        return figures.report_section(cls.table(store), cls.table(store, final=True), store.options(cls.name) or {})


__all__ = ["LABELS", "METHODS", "Representations", "sample_texts"]
