"""Faults across the probes: numbers as NumPy or tensor scalars, empty or wrong input to the probe functions,
progress inside a checkpoint, and one row per key in every table of every registered measurement.

The neighbours hold the rest of the fault suite: test_faults_checkpoints.py (loading, step names, files),
test_faults_samples.py (ids, targets, lengths, groups) and test_faults_store.py (fingerprints, corrupt parts,
overwrite, full disks, the writer lock with two real processes).
"""

import numpy as np
import polars as pl
import pytest
import torch

import workbench
from workbench import LossAccuracy, RoutingStats, measure
from workbench.checks import is_number, number, plain
from workbench.errors import InputError
from workbench.measure import registry
from workbench.probes.calibration import Calibration
from workbench.probes.calibration import functions as cal
from workbench.probes.linear.measurement import LinearProbeAccuracy
from workbench.probes.pathways import RoutingPathways
from workbench.probes.pathways import functions as P

# Tiny models: a second thread only adds synchronization (and contention on a shared machine).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- numbers at the boundary ----------------------------------------------------------------------------------------
def test_numpy_and_tensor_scalars_are_numbers_and_bools_are_not():
    assert plain(np.float32(0.7)) == 0.7 and type(plain(np.float32(0.7))) is float
    assert plain(np.int64(3)) == 3 and type(plain(np.int64(3))) is int
    assert plain(torch.tensor(0.7)) == 0.7 and plain(torch.tensor(5)) == 5 and plain(np.bool_(True)) is True
    assert is_number(np.float16(1)) and not is_number(True) and not is_number("1") and not is_number(torch.ones(2))
    with pytest.raises(InputError, match="n must be an integer, not 2.5"):
        number(2.5, "n", integer=True)


def test_tau_as_a_numpy_float_is_the_same_option_and_the_same_pathways():
    m = RoutingPathways(tau=np.float32(0.7))
    assert m.options()["tau"] == 0.7 == RoutingPathways().options()["tau"]
    w = torch.softmax(torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(0)), -1)
    assert P.pathways(w, np.float32(0.7)).texts() == P.pathways(w, 0.7).texts()
    with pytest.raises(InputError, match="tau must be in \\(0, 1\\]"):
        RoutingPathways(tau=True)


def test_bin_counts_as_numpy_integers_and_bools_refused():
    conf, correct = torch.tensor([0.2, 0.6, 0.9, 0.7]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert float(cal.ece(conf, correct, n_bins=np.int64(5))) == float(cal.ece(conf, correct, n_bins=5))
    assert Calibration(n_bins=np.int32(5)).options()["n_bins"] == 5
    with pytest.raises(InputError, match="n_bins must be a positive integer"):
        cal.ece(conf, correct, n_bins=True)


def test_an_empty_module_list_is_named():
    from workbench.probes.influence import fit_factors

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(InputError, match="modules= is an empty list"):
        fit_factors(model, [torch.zeros(2, 3)], loss_fn=lambda m, b, **k: m(b).sum(), modules=[])


def test_unknown_and_repeated_measurements_are_named(tiny_run):
    with pytest.raises(InputError, match="unknown measurement 'nonsense'; known: basic"):
        measure(tiny_run, ["nonsense"], progress=False)
    with pytest.raises(InputError, match="names must differ"):
        measure(tiny_run, [LossAccuracy(), LossAccuracy(per_sample=False)], progress=False)


# --- progress -----------------------------------------------------------------------------------------------------------
def test_long_work_shows_progress_inside_a_checkpoint_too(tiny_copy, capsys):
    measure(tiny_copy, [LossAccuracy()], steps=tiny_copy.steps[:2], token_budget=64)  # several capture batches
    err = capsys.readouterr().err
    assert "measuring tiny" in err and "capture:" in err


# --- one row per key in every table of every measurement ---------------------------------------------------------------
@pytest.fixture(scope="module")
def forgetting_run(tmp_path_factory):
    """A toy model made to forget (untrained: only the tables' shape matters); forget() measures it."""
    from workbench.models.toy import ToyConfig, ToyMoETransformer
    from workbench.probes import forgetting as fg
    from workbench.toys import tasks as toy_tasks

    torch.manual_seed(0)
    model = ToyMoETransformer(ToyConfig(vocab_size=toy_tasks.TASK_BASE + 5, n_ctx=11, d_model=16, n_heads=2,
                                        n_layers=2, n_experts=2, top_k=1, d_expert=16, layer_norm=True))
    facts = toy_tasks.make_task("facts", 2, n_train=40, n_test=12)
    return fg.forget(model, facts, tmp_path_factory.mktemp("forget") / "facts", n=24, epochs=1, batch_size=12,
                     n_checkpoints=2, variability_layer=-1, device="cpu", progress=False)


def test_every_table_of_every_measurement_has_one_row_per_key(tiny_copy, forgetting_run):
    from workbench.probes.influence import Influence

    ours = {n for n, cls in registry().items() if cls.__module__.startswith("workbench.probes.")}
    from workbench.probes.coherence import GradientCoherence
    from workbench.probes.representations import Representations

    covered = {"basic", "routing", "pathways", "calibration", "probes", "influence", "forgetting", "coherence",
               "representations"}
    assert ours <= covered, f"measure {sorted(ours - covered)} here too"
    measure(tiny_copy, [LossAccuracy(), RoutingStats(), RoutingPathways(max_pairs=50), Calibration(bootstrap=10),
                        LinearProbeAccuracy(max_epochs=5), GradientCoherence(max_samples=8), Representations(k=3)],
            steps=tiny_copy.steps[-3:], progress=False)
    s = tiny_copy.samples
    influence = Influence(queries=s.group("test").select([0, 1]), documents=s.group("train").select(range(6)),
                          top_k_tokens=1)
    measure(tiny_copy, [influence], steps=tiny_copy.steps[-1:], progress=False)
    tables = 0
    for store in (tiny_copy.store, forgetting_run.store):
        for name in store.probes():
            for final in (False, True):
                t = store.table(name, final=final)
                keys = [c for c in t.columns if c != "value"]
                assert t.select(keys).is_duplicated().sum() == 0, f"{name} (final={final}) repeats a key"
                tables += t.height > 0
    assert set(tiny_copy.store.probes()) | set(forgetting_run.store.probes()) == covered
    assert tables >= len(covered) + 1  # pathways' final table too
    basic = tiny_copy.store.table("basic").filter(pl.col("sample_id").is_null())
    assert sorted(basic["group"].unique().to_list()) == ["all", "test", "train"]
    assert workbench.samples.OVERALL == "all"
