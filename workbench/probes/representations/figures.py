"""Figures of the ``representations`` tables: the aligned 2-D layout at a checkpoint coloured by a chosen column,
neighbourhood purity and Fourier structure over checkpoints beside accuracy, a block × step heatmap, and the
report section (the layout with plotly's own frames and slider: it plays without a kernel)."""

from __future__ import annotations


import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.figures import PALETTE, Section, color, named_groups, nearest_step, with_slider
from workbench.probes.representations.findings import cyclic_layer, summary_text

#: Colour columns of the layout besides any column of an ``extra`` table.
COLORS = ("label", "group", "correct", "purity")
SYMBOLS = ("circle", "x", "diamond", "square", "triangle-up", "cross")
OTHER = "#c8c8c8"  # samples without a value in a categorical colour column


def _x(steps: list[int], log_x: bool) -> list[int]:
    return [max(s, 1) for s in steps] if log_x else steps


def embedding(final: pl.DataFrame, layer: int | None = None) -> pl.DataFrame:
    """The layout rows of one block (default: the first laid out), sorted by step and sample."""
    emb = final.filter(pl.col("metric") == "embedding")
    if emb.is_empty():
        raise InputError("the representations table has no 2-D layout; measure with method='pca' or 'umap'")
    layers = sorted(emb["layer"].unique().to_list())
    layer = layers[0] if layer is None else layer
    if layer not in layers:
        raise InputError(f"block {layer} was not laid out; the layout has blocks {layers}")
    return emb.filter(pl.col("layer") == layer).sort("step", "sample_id")


def _hover(d: pl.DataFrame) -> list[str]:
    # short: a report holds one per sample and checkpoint (the colour shows the rest)
    return [f"{t} → {lab} ({g})" for g, lab, t in d.select("group", "label", "text").iter_rows()]


def _marker(d: pl.DataFrame, by: str, period: int | None, categories: list) -> dict:
    if by == "label":
        hi = (period - 1) if period else max(1, int(d["label"].max() or 1))
        # cyclic labels (answers mod p) on a cyclic colour scale, so p - 1 and 0 look alike as they should
        return dict(color=d["label"].to_numpy(), colorscale="Phase" if period else "Viridis", cmin=0, cmax=hi,
                    colorbar=dict(title="label", len=0.8))
    if by == "purity":
        return dict(color=d["value"].to_numpy(), colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="purity"))
    if by == "correct":
        return dict(color=["#2ca02c" if ok else "#d62728" for ok in d["correct"].to_list()])
    if by == "group":
        return dict(color=[color(g, categories.index(g)) for g in d["group"].to_list()])
    cats = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(categories)}
    return dict(color=[cats.get(v, OTHER) for v in d[by].to_list()])


def embedding_scatter(final: pl.DataFrame, step: int | None = None, layer: int | None = None, by: str = "label",
                      extra: pl.DataFrame | None = None, period: int | None = None, size: int = 5) -> go.Figure:
    """The aligned 2-D layout at the embedded checkpoint nearest ``step``, one marker shape per group, coloured
    ``by`` a column: ``label``, ``group``, ``correct``, ``purity``, or a column of ``extra`` (a table keyed by
    ``sample_id``, e.g. each sample's memorized-at group). The axes are those of every checkpoint of the block,
    so the frames of a slider line up."""
    emb = embedding(final, layer)
    if extra is not None:
        if "sample_id" not in extra.columns or by not in extra.columns:
            raise InputError(f"extra must be a table with sample_id and the column {by!r}; it has {extra.columns}")
        emb = emb.join(extra.select("sample_id", by).unique("sample_id"), on="sample_id", how="left")
    elif by not in COLORS:
        raise InputError(f"colour by one of {COLORS} or pass extra= with that column; got {by!r}")
    steps = sorted(emb["step"].unique().to_list())
    at = nearest_step(steps, step)
    d = emb.filter(pl.col("step") == at)
    groups = named_groups(emb["group"].unique(maintain_order=True).to_list())
    categories = groups if by == "group" else sorted(v for v in emb[by].unique().to_list() if v is not None) \
        if by not in ("label", "purity", "correct") else []
    fig = go.Figure()
    for i, g in enumerate(groups):
        gd = d.filter(pl.col("group") == g)
        marker = _marker(gd, by, period, categories) | dict(size=size, symbol=SYMBOLS[i % len(SYMBOLS)],
                                                            line=dict(width=0))
        if i:  # one colour bar is enough
            marker.pop("colorbar", None)
        fig.add_trace(go.Scatter(x=gd["x"].to_numpy(), y=gd["y"].to_numpy(), mode="markers", name=g,
                                   text=_hover(gd), hoverinfo="text", marker=marker))
    pad = 0.05
    xlo, xhi = emb["x"].min(), emb["x"].max()
    ylo, yhi = emb["y"].min(), emb["y"].max()
    fig.update_xaxes(range=[xlo - pad * (xhi - xlo), xhi + pad * (xhi - xlo)], showticklabels=False, zeroline=False)
    fig.update_yaxes(range=[ylo - pad * (yhi - ylo), yhi + pad * (yhi - ylo)], showticklabels=False, zeroline=False,
                     scaleanchor="x")
    layer_shown = int(d["layer"][0]) if not d.is_empty() else layer
    fig.update_layout(height=480, margin=dict(t=40, b=20, l=20, r=20), legend=dict(orientation="h", y=-0.02),
                      title=dict(text=f"states after block {layer_shown} at step {at}, coloured by {by}", x=0.01))
    return fig


def _group_means(table: pl.DataFrame, metric: str, layer: int | None) -> pl.DataFrame:
    d = table.filter((pl.col("metric") == metric) & pl.col("sample_id").is_null())
    return d.filter(pl.col("layer") == layer) if layer is not None else d.filter(pl.col("layer").is_null())


def default_layer(table: pl.DataFrame) -> int:
    layers = table.filter(pl.col("metric") == "purity")["layer"].drop_nulls().unique().sort().to_list()
    if not layers:
        raise InputError("the representations table holds no purity")
    return layers[-1]


def purity_curves(table: pl.DataFrame, layer: int | None = None, step: int | None = None,
                  log_x: bool = True) -> go.Figure:
    """Per group over steps, at one block (default: the last measured): neighbourhood purity (dotted: its
    chance level); with cyclic labels, how many Fourier frequencies the label means' variance is spread over
    (dotted: the same with the labels' order shuffled); and the model's accuracy."""
    layer = default_layer(table) if layer is None else layer
    fourier = not _group_means(table, "fourier_frequencies", layer).is_empty()
    titles = ["neighbourhood purity"] + (["Fourier: effective frequencies"] if fourier else []) + ["accuracy"]
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.08)
    groups = named_groups(table["group"].unique(maintain_order=True).to_list())
    panels = [("purity", "purity_chance")] + ([("fourier_frequencies", "fourier_frequencies_shuffled")] if fourier else [])
    for i, g in enumerate(groups):
        c = color(g, i)
        for col, (metric, base) in enumerate(panels, start=1):
            d = _group_means(table, metric, layer).filter(pl.col("group") == g).sort("step")
            fig.add_trace(go.Scatter(x=_x(d["step"].to_list(), log_x), y=d["value"].to_numpy(), mode="lines+markers",
                                     name=g, legendgroup=g, showlegend=col == 1, line=dict(color=c),
                                     marker=dict(size=4)), row=1, col=col)
            b = _group_means(table, base, layer).filter(pl.col("group") == g).sort("step")
            fig.add_trace(go.Scatter(x=_x(b["step"].to_list(), log_x), y=b["value"].to_numpy(), mode="lines",
                                     name=f"{g}: chance", legendgroup=g, showlegend=False,
                                     line=dict(color=c, dash="dot", width=1)), row=1, col=col)
        a = _group_means(table, "accuracy", None).filter(pl.col("group") == g).sort("step")
        fig.add_trace(go.Scatter(x=_x(a["step"].to_list(), log_x), y=a["value"].to_numpy(), mode="lines", name=g,
                                 legendgroup=g, showlegend=False, line=dict(color=c)), row=1, col=len(titles))
    if step is not None:
        for col in range(1, len(titles) + 1):
            fig.add_vline(x=max(step, 1) if log_x else step, line=dict(color="black", dash="dot", width=1), row=1,
                          col=col)
    fig.update_xaxes(title_text="step", type="log" if log_x else "linear")
    fig.update_yaxes(range=[-0.02, 1.02], col=1)
    fig.update_yaxes(range=[-0.02, 1.02], col=len(titles))
    if fourier:
        fig.update_yaxes(rangemode="tozero", col=2)
    fig.update_layout(height=340, margin=dict(t=40, b=40, l=50, r=20), legend=dict(orientation="h", y=-0.22),
                      title=dict(text=f"states after block {layer}", x=0.01, y=0.99))
    return fig


def layer_heatmap(table: pl.DataFrame, group: str = "test", metric: str = "purity", step: int | None = None) -> go.Figure:
    """Block × step heatmap of a per-group metric (default: the held-out group's purity)."""
    d = table.filter((pl.col("metric") == metric) & pl.col("sample_id").is_null() & (pl.col("group") == group)
                     & pl.col("layer").is_not_null())
    if d.is_empty():
        raise InputError(f"the representations table has no per-block {metric} of group {group!r}")
    steps = sorted(d["step"].unique().to_list())
    w = d.pivot(on="step", index="layer", values="value", sort_columns=True).sort("layer")
    fig = go.Figure(go.Heatmap(z=w.select([str(s) for s in steps]).rows(), x=[str(s) for s in steps],
                               y=[f"block {v}" for v in w["layer"].to_list()], zmin=0, zmax=1,
                               colorscale="Viridis", colorbar=dict(title=metric)))
    if step is not None and step in steps:
        fig.add_vline(x=steps.index(step), line=dict(color="white", width=2))
    fig.update_layout(height=80 + 40 * w.height, margin=dict(t=40, b=40, l=70, r=20),
                      title=dict(text=f"{metric} per block: {group}", x=0.01), xaxis=dict(title="step", type="category"))
    return fig


def correlation_table(final: pl.DataFrame) -> pl.DataFrame:
    """Correlations with the accuracy group across checkpoints: group, layer, of, pearson, spearman."""
    d = final.filter(pl.col("metric") == "correlation") if not final.is_empty() else final
    if d.is_empty():
        return pl.DataFrame(schema={"group": pl.String, "layer": pl.Int32, "of": pl.String, "pearson": pl.Float64,
                                    "spearman": pl.Float64})
    return d.pivot(on="method", index=["group", "layer", "of"], values="value").sort("of", "group", "layer")


def report_section(table: pl.DataFrame, final: pl.DataFrame, opts: dict) -> Section | None:
    if table.is_empty():
        return None
    steps = sorted(table["step"].unique().to_list())
    layer = default_layer(table)
    sec = Section("Representations")
    sec.add(f"Neighbourhood purity: the share of each sample's {opts.get('k', 10)} nearest neighbours (in the hidden "
            f"state after a block, {opts.get('metric', 'euclidean')} distance) that share its {opts.get('label', 'answer')}; "
            "1 when each label is its own cluster. Layouts: 2-D coordinates of the same states, "
            f"{'AlignedUMAP' if opts.get('method') == 'umap' else 'principal components'} aligned across checkpoints "
            "so a sample moves only as much as the representation does.")
    text = summary_text(table, final)
    if text:
        sec.add(text)
    sec.add(with_slider(lambda s: purity_curves(table, layer, step=s), steps))
    groups = named_groups(table["group"].unique(maintain_order=True).to_list())
    test = opts.get("accuracy_group", "test")
    sec.add(layer_heatmap(table, test if test in groups else groups[0]))
    circle = cyclic_layer(table)
    if circle is not None and circle != layer:
        sec.add(with_slider(lambda s: purity_curves(table, circle, step=s), steps))
    if not final.is_empty() and (final["metric"] == "embedding").any():
        emb = final.filter(pl.col("metric") == "embedding")
        laid_out = sorted(emb["layer"].unique().to_list())
        shown = circle if circle in laid_out else laid_out[-1]
        emb_steps = sorted(emb.filter(pl.col("layer") == shown)["step"].unique().to_list())
        period = opts.get("period") or None
        sec.add(f"The layout of the states after block {shown} at {len(emb_steps)} checkpoints, coloured by "
                f"{'answer (a cyclic colour scale)' if period else 'label'}; one marker shape per group. The Jupyter "
                "view (RepresentationView) shows every block laid out and other colourings.")
        sec.add(with_slider(lambda s: embedding_scatter(final, s, shown, "label", period=period), emb_steps))
    return sec


__all__ = ["COLORS", "correlation_table", "default_layer", "embedding", "embedding_scatter", "layer_heatmap",
           "purity_curves", "report_section"]
