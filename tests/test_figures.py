"""Figures on the checkpoint axis, on hand-made tables: step 0 on log axes, bands only where defined, sliders
that change data, titles that say when a figure spans all checkpoints."""

import plotly.graph_objects as go
import polars as pl
import pytest

from workbench import figures
from workbench.errors import InputError
from workbench.probes.calibration.figures import _band, calibration_over_steps


def test_step_zero_is_drawn_left_of_the_first_step_and_labelled():
    assert figures.step_x([0, 1, 10], log_x=True) == [0.5, 1, 10]
    assert figures.step_x([0, 100, 1000], log_x=True) == [50, 100, 1000]
    assert figures.step_x([0, 5], log_x=False) == [0, 5]
    fig = go.Figure()
    figures.step_axis(fig, [0, 1, 4, 600], log_x=True)
    assert list(fig.layout.xaxis.tickvals) == [0.5, 1, 10, 100] and list(fig.layout.xaxis.ticktext) == ["0", "1", "10", "100"]


def test_a_band_is_closed_polygons_over_defined_runs_only():
    # steps 1..5; the interval is missing at step 3: two polygons, none across it
    x, y = _band([1, 2, 3, 4, 5], [0.1, 0.2, None, 0.3, 0.4], [0.5, 0.6, None, 0.7, 0.8], [1, 2, 3, 4, 5])
    assert x == [1, 2, 2, 1, None, 4, 5, 5, 4, None]
    assert y == [0.5, 0.6, 0.2, 0.1, None, 0.7, 0.8, 0.4, 0.3, None]
    assert _band([1, 2], [None, None], [None, None], [1, 2]) == ([], [])


def _calibration_table():
    rows = []
    for step, auroc in ((0, 0.4), (10, 0.6), (100, None), (1000, None)):  # undefined once every answer is right
        for metric, v in (("ece", 0.1), ("auroc", auroc), ("auroc_low", None if auroc is None else auroc - 0.1),
                          ("auroc_high", None if auroc is None else auroc + 0.1)):
            rows.append({"step": step, "metric": metric, "group": "train", "bin": None,
                         "value": float("nan") if v is None else v})
    return pl.DataFrame(rows, schema_overrides={"bin": pl.Int64})


def test_calibration_band_stops_where_auroc_is_undefined_and_the_step_shows_in_data_and_title():
    fig = calibration_over_steps(_calibration_table(), metrics=("auroc",), step=10)
    band = next(t for t in fig.data if t.fill == "toself")
    assert list(band.x) == [5, 10, 10, 5, None]  # steps 0 and 10 only; step 0 at half the first step (log axis)
    at = next(t for t in fig.data if t.mode == "markers")
    assert list(at.x) == [10] and list(at.y) == [0.6]
    assert fig.layout.title.text == "step 10: AUROC train 0.600"
    still = calibration_over_steps(_calibration_table(), metrics=("auroc",))
    assert "all checkpoints" in still.layout.title.text


def test_with_slider_needs_the_same_traces_at_every_step_and_carries_fixed_ranges():
    def build(s):
        fig = go.Figure([go.Bar(x=[s], y=[s])] * (1 if s < 2 else 2))
        return fig.update_xaxes(range=[0, s + 1])

    with pytest.raises(InputError, match="same traces"):
        figures.with_slider(build, [0, 1, 2])
    fig = figures.with_slider(build, [0, 1])
    assert [list(f.layout.xaxis.range) for f in fig.frames] == [[0, 1], [0, 2]]
    assert [list(f.data[0].y) for f in fig.frames] == [[0], [1]]
