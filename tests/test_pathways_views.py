"""Pathway figures, report section and PathwayView on a measured tiny run."""

import plotly.graph_objects as go
import polars as pl
import pytest

from workbench import Run, measure
from workbench.probes.pathways import figures as F
from workbench.figures import with_slider
from workbench.probes.pathways import parse_pathway
from workbench.probes.pathways.measurement import RoutingPathways


@pytest.fixture(scope="module")
def store(tiny_run, tmp_path_factory):
    run = Run.from_folder(tiny_run.root, samples=tiny_run.samples, store_root=tmp_path_factory.mktemp("pwv"))
    measure(run, [RoutingPathways()], progress=False)
    return run.store


def test_curves_have_one_line_per_group_and_panel(store):
    table = store.table("pathways", final=False)
    fig = F.pathway_curves(table, step=13)
    # distance, consistency mean and median, accuracy x (train, test), each with its value at the step
    assert len(fig.data) == 4 * 2 * 2
    d = table.filter((pl.col("metric") == "distance") & (pl.col("group") == "train") & pl.col("layer").is_null()
                     & pl.col("sample_id").is_null()).sort("step")
    train = next(t for t in fig.data if t.name == "train" and t.xaxis == "x")
    assert list(train.y) == d["value"].to_list()
    assert fig.layout.shapes[0].x0 == 13


def test_heatmap_is_layers_by_checkpoints(store):
    table = store.table("pathways", final=False)
    fig = F.layer_heatmap(table, "test", step=6)
    z = fig.data[0].z
    steps = sorted(table["step"].unique().to_list())
    assert len(z) == 4 and len(z[0]) == len(steps)
    assert fig.layout.shapes[0].x0 == steps.index(6)


def test_pathway_figure_draws_the_stored_pathway(store):
    table = store.table("pathways", final=False)
    text = table.filter((pl.col("sample_id") == "3+4") & (pl.col("step") == 13)
                        & (pl.col("metric") == "n_experts"))["pathway"].item()
    fig = F.pathway_figure(table, "3+4", step=13)
    now = fig.data[1]
    path = parse_pathway(text)
    assert list(now.y) == [e for layer in path for e in layer]
    assert list(fig.data[2].y) == [layer[0] for layer in path]  # the top expert joined across layers
    # frames for a report: the same traces at every step
    slid = with_slider(lambda s: F.pathway_figure(table, "3+4", step=s), [0, 13, 40])
    assert len(slid.frames) == 3 and {len(f.data) for f in slid.frames} == {3}


def test_since_curves_correlations_and_report_section(store):
    final = store.table("pathways", final=True)
    fig = F.since_curves(final, "distance", "train")
    groups = {g for g in final["group"].unique().to_list() if g and g.startswith("train@")}
    assert {t.name.split(" ")[0] for t in fig.data if t.showlegend is not False} == groups
    corr = F.correlation_table(final)
    assert set(corr.columns) == {"group", "of", "window", "pearson", "spearman"} and corr.height == 3 * 5 * 2
    sec = RoutingPathways.section(store)
    assert sec.title == "Routing pathways" and sum(isinstance(i, go.Figure) for i in sec.items) >= 3


def test_pathway_view_follows_slider_and_pickers(store):
    from widgets import PathwayView

    view = PathwayView(store)
    assert set(view.figures) >= {"curves", "layers", "pathway"}
    view.set_step(13)
    assert view.figures["curves"].layout.shapes[0].x0 == 13
    view.sample_picker.value = "3+4"
    assert view.figures["pathway"].layout.title.text.startswith("pathway of 3+4 at step 13")
    view.group_picker.value = "test"
    assert view.figures["layers"].layout.title.text.startswith("per-layer pathway distance, test, step 13")
