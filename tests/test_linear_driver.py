"""The ``probes`` measurement over a run, its figures, report section and view."""

import plotly.graph_objects as go
import polars as pl
import pytest
import torch

import workbench
from workbench.capture import CaptureSpec, capture
from workbench.errors import InputError
from workbench.probes.linear import figures as pf
from workbench.probes.linear import fit_probes
from workbench.probes.linear.measurement import LinearProbeAccuracy, answer_tokens, count_blocks


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    run = workbench.Run.from_folder(tiny_run.folder, store_root=tmp_path_factory.mktemp("probes"))
    store = workbench.measure(run, [LinearProbeAccuracy(), workbench.LossAccuracy(per_sample=False)],
                              progress=False)
    return run, store.table("probes")


def test_rows_per_layer_and_checkpoint(measured):
    run, t = measured
    n_blocks = run.info["model"]["n_layers"]
    assert count_blocks(run) == n_blocks
    per_layer = t.filter(pl.col("layer").is_not_null())
    assert sorted(per_layer["layer"].unique().to_list()) == list(range(n_blocks))
    assert sorted(t["step"].unique().to_list()) == run.steps
    assert set(t["metric"].unique().to_list()) == {"accuracy", "train_accuracy", "control_accuracy", "selectivity",
                                                    "epochs", "model_accuracy"}
    assert t["group"].unique().to_list() == ["all"]  # groups 'train' / 'test' are one task
    wide = per_layer.pivot(on="metric", index=["step", "layer"], values="value")
    assert ((wide["accuracy"] - wide["control_accuracy"] - wide["selectivity"]).abs() < 1e-6).all()
    assert wide["accuracy"].is_between(0, 1).all()
    # the model's own accuracy is the basic measurement's test accuracy at the same checkpoints
    basic = run.store.table("basic").filter((pl.col("metric") == "accuracy") & (pl.col("group") == "test"))
    mine = t.filter(pl.col("metric") == "model_accuracy").sort("step")["value"].to_list()
    assert mine == pytest.approx(basic.sort("step")["value"].to_list())


def test_matches_probes_fitted_by_hand(measured):
    """The driver's numbers are those of fit_probes on the captured hidden states, fitted independently."""
    run, t = measured
    step = run.steps[-1]
    model = run.checkpoint(step).load()
    n_blocks = count_blocks(run)
    cap = capture(model, run.samples, CaptureSpec(hidden_layers=tuple(range(n_blocks))), device="cpu")
    x = torch.stack([cap.hidden[v] for v in range(n_blocks)])
    tr, te = run.samples.indices("train"), run.samples.indices("test")
    classes, y = torch.unique(answer_tokens(run.samples.targets)[tr + te], return_inverse=True)
    probes = fit_probes(x[:, tr], y[: len(tr)], n_classes=len(classes))
    want = probes.accuracy(x[:, te], y[len(tr):])
    got = t.filter((pl.col("step") == step) & (pl.col("metric") == "accuracy")).sort("layer")["value"]
    assert got.to_list() == pytest.approx(want.tolist(), abs=1e-6)


def test_explicit_layers_and_bad_groups(tiny_run, tmp_path):
    m = LinearProbeAccuracy(layers=[-1]).settle(tiny_run)
    assert m.spec().hidden_layers == (-1,)
    assert LinearProbeAccuracy().settle(tiny_run).spec().hidden_layers == tuple(range(count_blocks(tiny_run)))
    with pytest.raises(InputError, match="does not know its layers"):
        LinearProbeAccuracy().spec()
    samples = tiny_run.samples
    flat = workbench.SampleSet(ids=samples.ids, groups=["samples"] * len(samples), input_ids=samples.input_ids,
                               targets=samples.targets)
    run = workbench.Run.from_folder(tiny_run.root, samples=flat, store_root=tmp_path)
    with pytest.raises(InputError, match="no task has both"):
        workbench.measure(run, [LinearProbeAccuracy()], steps=[run.steps[0]], progress=False)


def test_cli_knows_the_measurement():
    from workbench import cli

    assert isinstance(cli.build_measurements(["probes"], {}, [])[0], LinearProbeAccuracy)


def test_figures_and_report_section(measured):
    run, t = measured
    fig = pf.probe_overview(t, step=run.steps[1])
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap) and len(heat.z) == count_blocks(run) and len(heat.z[0]) == len(run.steps)
    assert "selectivity" in heat.hovertemplate
    layers = pf.probe_layers(t, "all")
    assert len(layers.data) == 4  # probe and control line at the first and last checkpoint
    sec = LinearProbeAccuracy.section(run.store, run)
    assert sec is not None and any(isinstance(i, go.Figure) for i in sec.items)
    with pytest.raises(InputError, match="no task 'nope'"):
        pf.probe_overview(t, "nope")


def test_probe_view(measured):
    from widgets import ProbeView

    run, _ = measured
    view = ProbeView(run)
    assert view.task == "all" and view.steps == run.steps
    before = view.figures["overview"].layout.title.text
    view.set_step(run.steps[0])
    assert view.figures["overview"].layout.title.text != before
