"""The Parquet store: schema, atomic parts, options under resume, and a killed measurement resumed."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest

from workbench import LossAccuracy, RoutingStats, Store, measure
from workbench.errors import StoreError
from workbench.store import KEYS, SCHEMA, tidy, write_parquet_atomic


def test_tidy_fills_key_columns_and_keeps_extra_ones():
    df = tidy(pl.DataFrame({"metric": ["a"], "value": [1], "expert": [3]}), step=5, probe="p")
    assert df.columns == KEYS + ["expert"]
    assert df.schema["layer"] == SCHEMA["layer"] and df["layer"][0] is None
    assert df["step"][0] == 5 and df["value"][0] == 1.0


def test_a_table_needs_values():
    with pytest.raises(StoreError, match="value"):
        tidy(pl.DataFrame({"metric": ["a"]}))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_parquet_atomic(pl.DataFrame({"value": [1.0]}), tmp_path / "x.parquet")
    assert [f.name for f in tmp_path.iterdir()] == ["x.parquet"]


def test_failed_write_keeps_the_old_part(tmp_path, monkeypatch):
    store = Store(tmp_path, run="r")
    store.write("p", 1, pl.DataFrame({"metric": ["m"], "value": [1.0]}))

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write("p", 1, pl.DataFrame({"metric": ["m"], "value": [2.0]}))
    monkeypatch.undo()
    assert store.table("p")["value"].to_list() == [1.0]
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["step_000001.parquet"]


def test_store_reads_across_probes_and_from_duckdb(tmp_path):
    store = Store(tmp_path, run="r")
    store.write("a", 2, pl.DataFrame({"metric": ["m"], "value": [1.0]}))
    store.write("b", 1, pl.DataFrame({"metric": ["m"], "layer": [3], "value": [2.0], "expert": [4]}))
    t = store.table()
    assert t["probe"].to_list() == ["b", "a"] and t["expert"].to_list() == [4, None]  # sorted by step first
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/*/*.parquet', union_by_name=true)").fetchall()[0][0]
    assert n == 2


def test_resume_under_other_options_is_refused(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    measure(run, [RoutingStats()], progress=False, steps=run.steps[:1])
    with pytest.raises(StoreError, match="routing_weights"):
        measure(run, [RoutingStats(routing_weights="topk")], progress=False)
    measure(run, [RoutingStats(routing_weights="topk")], progress=False, overwrite=True)
    assert run.store.options("routing") == {"routing_weights": "topk"}


def test_measure_writes_one_part_per_checkpoint(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    store = measure(run, [LossAccuracy(), RoutingStats()], progress=False)
    assert store.steps("basic") == run.steps == store.steps("routing")
    basic = store.table("basic")
    # the group mean equals the mean of the per-sample rows
    per = basic.filter(pl.col("sample_id").is_not_null() & (pl.col("metric") == "loss") & (pl.col("group") == "train"))
    mean = basic.filter(pl.col("sample_id").is_null() & (pl.col("metric") == "loss") & (pl.col("group") == "train"))
    got = per.group_by("step").agg(pl.col("value").mean()).sort("step")["value"].to_list()
    assert mean.sort("step")["value"].to_list() == pytest.approx(got)
    # the built-in run's own training log agrees with the measured accuracy
    acc = basic.filter(pl.col("sample_id").is_null() & (pl.col("metric") == "accuracy") & (pl.col("group") == "test"))
    logged = run.metrics().sort("step")["test_acc"].to_list()
    assert acc.sort("step")["value"].to_list() == pytest.approx(logged, abs=1e-6)


def _copy(run, tmp_path):
    from workbench import Run

    dst = tmp_path / run.root.name
    shutil.copytree(run.root, dst, ignore=shutil.ignore_patterns("store"))
    return Run.from_folder(dst)


SCRIPT = textwrap.dedent(
    """
    import sys, time
    from workbench import Run, LossAccuracy, RoutingStats, measure

    class Slow(RoutingStats):
        def measure(self, cap, ctx):
            time.sleep(float(sys.argv[2]))
            return super().measure(cap, ctx)

    measure(Run.from_folder(sys.argv[1]), [LossAccuracy(), Slow()], progress=False)
    print("done")
    """
)


@pytest.mark.slow
def test_killed_measurement_resumes_to_identical_tables(tiny_run, tmp_path):
    a = _copy(tiny_run, tmp_path / "a")
    b = _copy(tiny_run, tmp_path / "b")
    script = tmp_path / "measure.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(a.root), "0.5"], env=env)
    deadline = time.time() + 120
    while len(a.store.steps("routing")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = a.store.steps("routing")
    assert 2 <= len(done) < len(a.steps), "the kill should land mid-run"
    out = subprocess.run([sys.executable, str(script), str(a.root), "0"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    subprocess.run([sys.executable, str(script), str(b.root), "0"], env=env, check=True)
    for probe in ("basic", "routing"):
        assert a.store.table(probe).equals(b.store.table(probe))
    leftovers = [f for f in a.store.root.rglob("*") if f.name.endswith(".tmp")]
    assert leftovers == []


def test_an_error_mid_run_keeps_what_was_measured(tiny_run, tmp_path):
    """A checkpoint that fails (here: corrupt) stops the run with its error; the parts before it stay, and
    after the fix the run resumes from there."""
    from workbench.errors import CorruptCheckpointError

    run = _copy(tiny_run, tmp_path)
    bad = run.checkpoints[3].path / "model.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(good[:64])
    with pytest.raises(CorruptCheckpointError):
        measure(run, [LossAccuracy()], progress=False)
    assert run.store.steps("basic") == run.steps[:3]
    first = run.store.table("basic")
    bad.write_bytes(good)
    measure(run, [LossAccuracy()], progress=False)
    assert run.store.steps("basic") == run.steps
    assert run.store.table("basic").filter(pl.col("step").is_in(run.steps[:3])).equals(first)


def test_temporary_files_of_dead_writers_are_removed_when_a_probe_resumes(tmp_path, monkeypatch):
    # A writer killed between creating its temporary file and renaming it leaves the file behind; the next
    # begin() of that probe removes it, and leaves those of writers still running (and the parts) alone.
    store = Store(tmp_path / "store", run="r")
    store.begin("basic", {"a": 1})
    store.write("basic", 0, pl.DataFrame({"metric": ["loss"], "value": [1.0]}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "store" / "basic"
    orphan = folder / f".step_000001.parquet.{dead.pid}.x1y2.tmp"
    running = folder / f".step_000002.parquet.{os.getppid()}.x3y4.tmp"
    foreign = folder / ".notes.tmp"
    for f in (orphan, running, foreign):
        f.write_bytes(b"partial")
    store.begin("basic", {"a": 1})
    assert not orphan.exists() and running.exists() and foreign.exists()
    assert store.steps("basic") == [0]
    # the writers name their temporary files with their process id
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(os.path.basename(src)), real(src, dst))[1])
    store.write("basic", 1, pl.DataFrame({"metric": ["loss"], "value": [2.0]}))
    assert seen and seen[0].startswith(f".step_000001.parquet.{os.getpid()}.")
