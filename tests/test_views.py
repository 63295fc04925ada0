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
    assert fig.layout.shapes[0].x0 == measured.steps[2]
    # the values at the step: one marker per curve, and in the title
    at = [t for t in fig.data if t.name is None and t.mode == "markers"]
    test_at = next(t for t in at if t.legendgroup == "test" and t.xaxis == "x")
    assert len(at) == 4 and list(test_at.x) == [measured.steps[2]]
    v = want.filter(pl.col("step") == measured.steps[2])["value"].item()
    assert list(test_at.y) == pytest.approx([v]) and f"test accuracy {v:.3f}" in fig.layout.title.text


def test_step_zero_sits_left_of_step_one_on_log_axes_and_is_labelled(measured):
    basic = measured.store.table("basic")
    fig = training_curves(basic, step=0)
    x = list(next(t for t in fig.data if t.name == "test").x)
    assert measured.steps[:2] == [0, 1] and x[:2] == [0.5, 1]
    assert fig.layout.shapes[0].x0 == 0.5
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.tickvals[0] == 0.5 and fig.layout.xaxis.ticktext[0] == "0"


def test_checkpoint_explorer_slider_redraws_step_dependent_panels(measured):
    from widgets import CheckpointExplorer

    ex = CheckpointExplorer(measured)
    assert ex.step == measured.steps[-1]
    before = ex.figures["routing_at_step"].layout.title.text
    ex.set_step(measured.steps[0])
    assert ex.figures["routing_at_step"].layout.title.text == f"routing at step {measured.steps[0]}" != before
    assert ex.figures["training"].layout.shapes[0].x0 == 0.5  # step 0 on the log axis
    # the panels show what figures hold: plotly JSON in each panel's one output, the step in its title
    out = ex.panels["routing_at_step"].outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert out["layout"]["title"]["text"] == f"routing at step {measured.steps[0]}"


def test_view_state_lives_in_the_widget_models(measured):
    """What a browser reload restores from the kernel: the slider's index and each panel's output, all at the
    same step (a reloaded view must not show one step on its slider and another in a panel)."""
    from widgets import CheckpointExplorer

    ex = CheckpointExplorer(measured, step=measured.steps[3])
    state = ex.slider.get_state()
    assert state["_options_labels"][state["index"]] == str(measured.steps[3])
    for name, panel in ex.panels.items():
        fig = panel.get_state()["outputs"][0]["data"]["application/vnd.plotly.v1+json"]
        assert f"step {measured.steps[3]}" in fig["layout"]["title"]["text"], name


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
