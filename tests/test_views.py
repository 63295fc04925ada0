"""Figures and the CheckpointExplorer: one slider moves every panel."""

import polars as pl
import pytest

from workbench import LossAccuracy, RoutingStats, Run, figures, measure
from workbench.probes.basic.figures import training_curves
from workbench.probes.routing.figures import routing_at_step
from workbench.errors import StoreError


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    run = Run.from_folder(tiny_run.folder, store_root=tmp_path_factory.mktemp("views"))
    measure(run, [LossAccuracy(), RoutingStats()], progress=False)
    return run


def test_with_slider_has_one_frame_per_step(measured):
    routing = measured.store.table("routing")
    steps = sorted(routing["step"].unique().to_list())
    fig = figures.with_slider(lambda s: routing_at_step(routing, step=s), steps)
    assert [f.name for f in fig.frames] == [str(s) for s in steps]
    assert [s["label"] for s in fig.layout.sliders[0].steps] == [str(s) for s in steps]
    # each frame shows its own step's numbers
    first = routing.filter((pl.col("step") == steps[0]) & (pl.col("metric") == "load_entropy") & (pl.col("group") == "all"))
    bars = [t for t in fig.frames[0].data if t.type == "bar" and t.name == "all"][0]
    assert list(bars.y) == pytest.approx(first.sort("layer")["value"].to_list())


def test_training_curves_follow_the_table(measured):
    basic = measured.store.table("basic")
    fig = training_curves(basic, step=measured.steps[2])
    test_acc = [t for t in fig.data if t.name == "test" and t.xaxis == "x"][0]
    want = basic.filter(pl.col("sample_id").is_null() & (pl.col("metric") == "accuracy") & (pl.col("group") == "test"))
    assert list(test_acc.y) == pytest.approx(want.sort("step")["value"].to_list())
    assert fig.layout.shapes[0].x0 == max(measured.steps[2], 1)


def test_checkpoint_explorer_slider_redraws_step_dependent_panels(measured):
    from widgets import CheckpointExplorer

    ex = CheckpointExplorer(measured)
    assert ex.step == measured.steps[-1]
    before = ex.figures["routing_at_step"].layout.title.text
    ex.set_step(measured.steps[0])
    assert ex.figures["routing_at_step"].layout.title.text == f"routing at step {measured.steps[0]}" != before
    assert ex.figures["training"].layout.shapes[0].x0 == max(measured.steps[0], 1)


def test_linked_views_share_the_slider(measured):
    from widgets import CheckpointExplorer

    a, b = CheckpointExplorer(measured), CheckpointExplorer(measured)
    b.link_to(a)
    a.set_step(measured.steps[1])
    assert b.step == measured.steps[1]


def test_explorer_on_an_unmeasured_store_says_what_to_do(tmp_path):
    from widgets import CheckpointExplorer
    from workbench import Store

    with pytest.raises(StoreError, match="measure the run first"):
        CheckpointExplorer(Store(tmp_path))
