"""The calibration measurement over a run, its figures, the ReliabilityView and the report section."""

import math

import plotly.graph_objects as go
import polars as pl
import pytest
import torch

from workbench import LossAccuracy, Run, capture, measure
from workbench.errors import InputError, StoreError
from workbench.probes import calibration as cal
from workbench.probes.calibration.measurement import SCALARS, Calibration, scalar_table, transition_summary


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    run = Run.from_folder(tiny_run.folder, store_root=tmp_path_factory.mktemp("cal"))
    measure(run, [Calibration(bootstrap=200), LossAccuracy()], progress=False)
    return run


def test_rows_match_the_metrics_on_a_fresh_capture(measured):
    run = measured
    table = run.store.table("calibration")
    step = run.steps[-1]
    cap = capture(run.checkpoint(step).load(), run.samples, device="cpu")
    idx = cap.group_indices("test")
    conf, right = cap.confidence[idx].double(), (cap.accuracy[idx] >= 1).double()
    at = scalar_table(table).filter((pl.col("step") == step) & (pl.col("group") == "test")).row(0, named=True)
    assert at["n"] == len(idx)
    assert at["accuracy"] == pytest.approx(float(right.mean()))
    assert at["ece"] == pytest.approx(float(cal.ece(conf, right)), abs=1e-6)
    assert at["ece_quantile"] == pytest.approx(float(cal.ece(conf, right, binning="quantile")), abs=1e-6)
    assert at["brier"] == pytest.approx(float(cal.brier(conf, right)), abs=1e-6)
    if not math.isnan(at["auroc"]):
        assert at["auroc"] == pytest.approx(float(cal.auroc(conf, right)), abs=1e-6)
        assert at["auroc_low"] <= at["auroc"] + 1e-9 <= at["auroc_high"] + 2e-9
    assert at["overconfidence"] == pytest.approx(float(conf.mean() - right.mean()), abs=1e-6)
    # the test accuracy agrees with the basic measurement of the same checkpoint
    basic = run.store.table("basic").filter((pl.col("step") == step) & (pl.col("group") == "test")
                                           & (pl.col("metric") == "accuracy") & pl.col("sample_id").is_null())
    assert at["accuracy"] == pytest.approx(basic["value"][0], abs=1e-6)


def test_every_step_and_group_has_all_metrics_and_whole_reliability_tables(measured):
    table = measured.store.table("calibration")
    wide = scalar_table(table)
    assert sorted(wide["step"].unique().to_list()) == measured.steps
    assert set(wide["group"].unique().to_list()) == {"train", "test", "all"}
    assert set(SCALARS) <= set(wide.columns) and {"ece_low", "ece_high", "auroc_low", "auroc_high"} <= set(wide.columns)
    bins = table.filter(pl.col("metric") == "reliability_count")
    per = bins.group_by("step", "group").agg(pl.col("value").sum().alias("n"), pl.len().alias("bins"))
    joined = per.join(wide.select("step", "group", pl.col("n").alias("n_scalar")), on=["step", "group"])
    assert (joined["bins"] == 10).all() and (joined["n"] == joined["n_scalar"]).all()
    totals = wide.filter(pl.col("group") != "all").group_by("step").agg(pl.col("n").sum())
    assert (totals["n"] == len(measured.samples)).all()


def test_measuring_again_with_other_options_is_refused_and_resume_writes_nothing_new(measured):
    parts = {p: p.stat().st_mtime_ns for p in (measured.store.root / "calibration").glob("step_*.parquet")}
    measure(measured, [Calibration(bootstrap=200)], progress=False)
    assert {p: p.stat().st_mtime_ns for p in parts} == parts
    with pytest.raises(StoreError, match="n_bins"):
        measure(measured, [Calibration(n_bins=5, bootstrap=200)], progress=False)


def test_driver_options_are_checked():
    with pytest.raises(InputError, match="binning"):
        Calibration(binning="equal")
    with pytest.raises(InputError, match="n_bins"):
        Calibration(n_bins=0)
    with pytest.raises(InputError, match="correct_threshold"):
        Calibration(correct_threshold=0)


def test_a_group_answered_all_right_stores_nan_auroc_without_crashing(tiny_run):
    from workbench.capture import Capture

    n = 6
    cap = Capture(sample_ids=[str(i) for i in range(n)], groups=["a"] * 3 + ["b"] * 3,
                  loss=torch.zeros(n), accuracy=torch.tensor([1.0, 1, 1, 0, 1, 0]),
                  confidence=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, float("nan")]), target_prob=torch.zeros(n),
                  n_scored=torch.ones(n, dtype=torch.long), n_tokens=torch.full((n,), 3))
    df = Calibration(bootstrap=20).measure(cap, None)
    wide = df.filter(pl.col("bin").is_null()).pivot(on="metric", index="group", values="value")
    a = wide.filter(pl.col("group") == "a").row(0, named=True)
    b = wide.filter(pl.col("group") == "b").row(0, named=True)
    assert math.isnan(a["auroc"]) and a["accuracy"] == 1.0
    assert b["n"] == 2 and b["auroc"] == 0.0  # the NaN-confidence sample is left out; .6 wrong > .5 right


def test_figures_leave_undefined_values_as_gaps(tmp_path):
    from workbench import Store
    from workbench.capture import Capture
    from workbench.probes.calibration.figures import calibration_at_step, calibration_over_steps, reliability_diagram

    store = Store(tmp_path, run="r")
    for step, acc in ((0, [1.0, 0, 1, 0]), (10, [1.0, 1, 1, 0])):
        cap = Capture(sample_ids=list("abcd"), groups=["train", "train", "test", "test"], loss=torch.zeros(4),
                      accuracy=torch.tensor(acc), confidence=torch.tensor([0.9, 0.6, 0.7, 0.4]),
                      target_prob=torch.zeros(4), n_scored=torch.ones(4, dtype=torch.long), n_tokens=torch.ones(4))
        store.write("calibration", step, Calibration(bootstrap=20).measure(cap, None))
    table = store.table("calibration")
    figs = [calibration_over_steps(table), reliability_diagram(table, step=10), calibration_at_step(table, step=10)]
    for fig in figs:
        for trace in fig.data:
            ys = [v for v in (trace.y or []) if v is not None]
            assert not any(math.isnan(v) for v in ys), trace.name
    assert "train ECE" in figs[1].layout.title.text and "AUROC undefined" in figs[1].layout.title.text
    train_auroc = [t for t in figs[0].data if t.name == "train" and t.yaxis == "y2"][0]
    assert list(train_auroc.y) == [1.0, None]  # step 10: all train answers right, AUROC undefined


def test_transition_summary_finds_the_landmarks(measured):
    summ = transition_summary(measured.store.table("calibration"))
    assert summ["landmark"][0] == "first checkpoint" and summ["landmark"][-1] == "last checkpoint"
    assert summ["step"][0] == measured.steps[0] and summ["step"][-1] == measured.steps[-1]
    assert {"test_ece", "test_auroc", "train_accuracy"} <= set(summ.columns)
    with pytest.raises(InputError, match="no group"):
        transition_summary(measured.store.table("calibration"), group="valid")


# --- figures, view, report ----------------------------------------------------------------------------------------
def test_reliability_figure_shows_the_stored_bins(measured):
    from workbench.probes.calibration.figures import reliability_diagram

    table = measured.store.table("calibration")
    step = measured.steps[-1]
    fig = reliability_diagram(table, step=step, groups=["test"])
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    stored = table.filter((pl.col("step") == step) & (pl.col("group") == "test")
                          & (pl.col("metric") == "reliability_accuracy")).sort("bin")["value"].to_list()
    assert list(bars[0].y) == stored
    with pytest.raises(InputError, match="no group"):
        reliability_diagram(table, groups=["valid"])


def test_slider_frames_keep_the_same_traces(measured):
    from workbench import figures
    from workbench.probes.calibration.figures import calibration_at_step, calibration_over_steps

    table = measured.store.table("calibration")
    fig = figures.with_slider(lambda s: calibration_at_step(table, step=s), measured.steps)
    assert len(fig.frames) == len(measured.steps)
    assert len({len(f.data) for f in fig.frames}) == 1
    titles = [f.layout.title.text.split("<br>")[0] for f in fig.frames]
    assert titles == [f"calibration at step {s}" for s in measured.steps]
    over = calibration_over_steps(table, metrics=("ece", "auroc", "brier"), step=measured.steps[2])
    assert len([t for t in over.data if t.name == "test"]) == 3
    with pytest.raises(InputError, match="no metric"):
        calibration_over_steps(table, metrics=("f1",))


def test_reliability_view_follows_its_slider(measured):
    from widgets import ReliabilityView

    view = ReliabilityView(measured)
    assert view.step == measured.steps[-1]
    view.set_step(measured.steps[1])
    assert f"step {measured.steps[1]}" in view.figures["reliability"].layout.title.text
    with pytest.raises(StoreError, match="calibration"):
        from workbench import Store

        ReliabilityView(Store(measured.store.root / "nothing"))


def test_report_section_and_registration(measured, tmp_path):
    from workbench.cli import build_measurements
    from workbench.measure import demo_measurements, registry
    from workbench.report import build_sections, run_report

    assert isinstance(build_measurements(["calibration"], {}, [])[0], Calibration)
    assert "calibration" in demo_measurements()
    assert registry()["calibration"] is Calibration
    dotted = ["calibration"]
    sec = build_sections(measured.store, measured, dotted)[0]
    assert sec.title == "Calibration and discrimination"
    assert any("first checkpoint (step 0)" in str(i) for i in sec.items)
    html = run_report(measured, tmp_path / "r.html", sections=dotted).read_text()
    assert "Calibration and discrimination" in html and "reliability diagram" in html
