"""Faults in the store: a resume under other samples, dtype, model or version; corrupt parts and metadata;
an overwrite that fails half-way; full disks and read-only folders; and one writer at a time."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from workbench import LossAccuracy, SampleSet, Store, cli, measure
from workbench.errors import CorruptCheckpointError, InputError, StoreError, StoreLockedError
from workbench.lock import LOCK_NAME, StaleLockWarning, StoreLock, job_id, process_start
from workbench.store import StoreFormatWarning

QUIET = dict(progress=False)

# Tiny models: a second thread only adds synchronization (and contention on a shared machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def _files(store):
    """Every file of the store with its bytes: to show that a refused or failed call changed nothing."""
    return {str(f.relative_to(store.root)): f.read_bytes() for f in sorted(store.root.rglob("*")) if f.is_file()}


@pytest.fixture
def measured(tiny_copy):
    """The tiny run's copy with LossAccuracy measured at its first three checkpoints."""
    measure(tiny_copy, [LossAccuracy()], steps=tiny_copy.steps[:3], **QUIET)
    return tiny_copy


# --- a resume must be of the same thing ----------------------------------------------------------------------------
def test_a_resume_on_other_samples_is_refused_naming_them(measured):
    before = _files(measured.store)
    other = measured.samples.select(range(10))
    with pytest.raises(StoreError, match="samples \\(the samples' ids, tokens or targets\\): stored '[0-9a-f]+', now"):
        measure(measured, [LossAccuracy()], samples=other, **QUIET)
    assert _files(measured.store) == before


def test_a_resume_in_another_dtype_is_refused(measured):
    with pytest.raises(StoreError, match="dtype .*stored None, now 'torch.float64'.*overwrite=True"):
        measure(measured, [LossAccuracy()], dtype=torch.float64, **QUIET)


def test_a_resume_of_another_model_into_the_same_store_is_refused(measured, tmp_path):
    from tests.tiny_models import save_series
    from workbench import Run

    other = Run.from_folder(save_series("llama", tmp_path / "other", steps=(0,)), store_root=measured.root,
                            samples=SampleSet.from_token_lists([[3, 4, 5]]))
    with pytest.raises(StoreError, match="model.architecture: stored '[0-9a-f]+', now.*model.kind: stored 'builtin'"):
        measure(other, [LossAccuracy()], **QUIET)


def test_a_new_version_of_a_measurement_is_not_resumed(measured):
    class LossAccuracyV2(LossAccuracy):  # keeps the table "basic"; its numbers changed with the code
        version = 2

    with pytest.raises(StoreError, match="version \\(the measurement's version .*stored 1, now 2"):
        measure(measured, [LossAccuracyV2()], **QUIET)
    measure(measured, [LossAccuracy()], **QUIET)  # the same version resumes
    assert measured.store.steps("basic") == measured.steps


def test_numpy_options_resume_a_store_measured_with_python_numbers(measured):
    from workbench.probes.calibration import Calibration

    measure(measured, [Calibration(n_bins=10, level=0.95, bootstrap=20)], steps=[0], **QUIET)
    measure(measured, [Calibration(n_bins=np.int64(10), level=np.float32(0.95), bootstrap=20)], steps=[1], **QUIET)
    assert measured.store.options("calibration")["level"] == 0.95


def test_a_store_from_before_fingerprints_resumes_with_a_warning(measured):
    d = measured.store.root / "basic"
    (d / "fingerprint.json").unlink()
    with pytest.warns(StoreFormatWarning, match="before stores recorded fingerprints"):
        measure(measured, [LossAccuracy()], steps=measured.steps[:4], **QUIET)
    assert measured.store.fingerprint("basic")["version"] == 1  # recorded now: the next resume is checked
    (d / "fingerprint.json").unlink()
    with pytest.raises(StoreError, match="other options \\(per_sample differ"):
        measure(measured, [LossAccuracy(per_sample=False)], **QUIET)
    (d / "options.json").unlink()
    with pytest.raises(StoreError, match="neither fingerprint.json nor options.json"):
        measure(measured, [LossAccuracy()], **QUIET)


def test_steps_that_the_run_does_not_have_are_refused(measured):
    with pytest.raises(InputError, match="no checkpoints at steps \\[999\\]; its steps are \\[0, 1,"):
        measure(measured, [LossAccuracy()], steps=[999], **QUIET)
    with pytest.raises(InputError, match="steps is empty"):
        measure(measured, [LossAccuracy()], steps=[], **QUIET)
    with pytest.raises(InputError, match="integers"):
        measure(measured, [LossAccuracy()], steps=[1.5], **QUIET)
    measure(measured, [LossAccuracy()], steps=np.int64(measured.steps[3]), **QUIET)
    assert measured.store.steps("basic") == measured.steps[:4]


# --- overwrite: the old table stays whole until the new one is complete ---------------------------------------------
def test_an_overwrite_that_fails_half_way_leaves_the_old_table_whole(measured):
    measure(measured, [LossAccuracy()], **QUIET)
    old = measured.store.table("basic")
    bad = measured.checkpoints[3].path / "model.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(good[:64])
    with pytest.raises(CorruptCheckpointError, match="step_000013"):
        measure(measured, [LossAccuracy(per_sample=False)], overwrite=True, **QUIET)
    assert measured.store.table("basic").equals(old) and measured.store.options("basic") == {"per_sample": True}
    found = measured.store.verify()
    assert [p.what.split(":")[0] for p in found] == ["an overwrite that did not finish"]
    bad.write_bytes(good)
    loads = []
    real = type(measured.checkpoints[0]).load
    measured.checkpoints[0].__class__.load = lambda self, **kw: (loads.append(self.step), real(self, **kw))[1]
    try:  # the overwrite resumes its own new table: the three finished checkpoints are not measured again
        measure(measured, [LossAccuracy(per_sample=False)], overwrite=True, **QUIET)
    finally:
        measured.checkpoints[0].__class__.load = real
    assert loads == measured.steps[3:]
    new = measured.store.table("basic")
    assert new["sample_id"].null_count() == new.height and new["step"].unique().sort().to_list() == measured.steps
    assert measured.store.verify() == [] and not list(measured.store.root.glob(".basic.*"))


def test_ctrl_c_during_an_overwrite_leaves_the_old_table_whole(measured):
    old = _files(measured.store)

    class Interrupted(LossAccuracy):
        def measure(self, cap, ctx):
            if ctx.step == measured.steps[1]:
                raise KeyboardInterrupt
            return super().measure(cap, ctx)

    with pytest.raises(KeyboardInterrupt):
        measure(measured, [Interrupted()], overwrite=True, **QUIET)
    assert {k: v for k, v in _files(measured.store).items() if not k.startswith(".basic.new")} == old
    assert not (measured.store.root / LOCK_NAME).exists()  # the lock is released on the way out


@pytest.mark.parametrize("finished", [True, False])
def test_a_crash_between_the_two_renames_of_a_swap_is_recovered(measured, finished):
    import shutil

    root = measured.store.root
    old = measured.store.table("basic")
    shutil.copytree(root / "basic", root / ".basic.new")
    (root / ".basic.new" / "new.txt").touch()
    (root / "basic").rename(root / ".basic.old")  # the swap's first rename happened, the second did not
    if finished:
        (root / ".basic.new" / ".complete").touch()
    measure(measured, [LossAccuracy()], steps=measured.steps[:3], **QUIET)
    assert (root / "basic" / "new.txt").exists() == finished  # the new table if it was complete, else the old
    assert measured.store.table("basic").equals(old)
    assert not (root / ".basic.old").exists() and not (root / "basic" / ".complete").exists()


# --- corrupt parts and metadata ---------------------------------------------------------------------------------------
def test_a_truncated_part_is_named_listed_repaired_and_measured_again(measured):
    store = measured.store
    want = store.table("basic")
    part = store.root / "basic" / "step_000001.parquet"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(StoreError, match="step_000001.parquet is corrupt or unreadable.*store verify .* --repair"):
        store.table("basic")
    assert [(p.path, p.repairable) for p in store.verify()] == [(part, True)]
    assert [p.path for p in store.repair()] == [part] and not part.exists()
    measure(measured, [LossAccuracy()], steps=measured.steps[:3], **QUIET)
    assert store.table("basic").equals(want) and store.verify() == []


def test_a_truncated_options_file_is_named_and_rewritten_from_the_fingerprint(measured):
    store = measured.store
    f = store.root / "basic" / "options.json"
    f.write_text('{"per_sa')
    with pytest.raises(StoreError, match="options.json cannot be read"):
        store.options("basic")
    assert [p.path.name for p in store.repair()] == ["options.json"]
    assert store.options("basic") == {"per_sample": True}
    fp = store.root / "basic" / "fingerprint.json"
    fp.write_text("{")
    with pytest.raises(StoreError, match="fingerprint.json cannot be read"):
        measure(measured, [LossAccuracy()], **QUIET)
    store.repair()
    with pytest.warns(StoreFormatWarning):
        measure(measured, [LossAccuracy()], steps=measured.steps[:3], **QUIET)


def test_a_part_with_the_wrong_rows_is_listed(measured):
    store = measured.store
    d = store.root / "basic"
    (d / "step_000001.parquet").rename(d / "step_000005.parquet")
    d.joinpath("final.parquet").write_bytes(b"PAR1garbage")
    (d / ".step_000009.parquet.999999999.ab.tmp").write_bytes(b"half")
    (store.root / f"{LOCK_NAME}.999999999.cd.tmp").write_text("{")
    found = {p.path.name: p.what for p in store.verify()}
    assert found[f"{LOCK_NAME}.999999999.cd.tmp"] == "a lock file left by a writer that no longer runs"
    assert found["step_000005.parquet"] == "holds rows of step(s) [1], not 5"
    assert found["final.parquet"].startswith("cannot be read")
    assert found[".step_000009.parquet.999999999.ab.tmp"].startswith("a temporary file left by a writer")


def test_store_verify_on_the_command_line(measured, capsys):
    part = measured.store.root / "basic" / "step_000000.parquet"
    part.write_bytes(b"")
    assert cli.main(["store", "verify", str(measured.root)]) == 1
    out = capsys.readouterr().out
    assert f"found: {part}" in out and "--repair" in out
    assert cli.main(["store", "verify", str(measured.root), "--repair"]) == 0
    assert f"repaired: {part}" in capsys.readouterr().out and not part.exists()
    assert cli.main(["store", "verify", str(measured.store.root)]) == 0
    (measured.store.root).rename(measured.root / "moved")
    assert cli.main(["store", "verify", str(measured.root)]) == 2
    assert "run folder without a store" in capsys.readouterr().err


# --- a full disk, a read-only folder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_a_failed_write_is_named_and_leaves_no_temporary_file(measured, monkeypatch, code, hint):
    before = _files(measured.store)

    def fail(self, path, *a, **k):  # as root, chmod would not stop the write: the writer fails instead
        with open(path, "wb") as f:
            f.write(b"PAR1 half a part")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pl.DataFrame, "write_parquet", fail)
    with pytest.raises(StoreError, match=f"cannot write .*basic/step_000013.parquet .*{hint}.*Nothing already"):
        measure(measured, [LossAccuracy()], **QUIET)
    assert {k: v for k, v in _files(measured.store).items() if k.endswith(".parquet")} == \
           {k: v for k, v in before.items() if k.endswith(".parquet")}
    assert not list(measured.store.root.rglob("*.tmp")) and not (measured.store.root / LOCK_NAME).exists()


def test_a_store_that_cannot_be_written_refuses_before_measuring(tiny_copy, monkeypatch):
    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "link", read_only)
    with pytest.raises(StoreError, match="cannot create the lock file .*Read-only file system.*store_root"):
        measure(tiny_copy, [LossAccuracy()], **QUIET)
    monkeypatch.undo()
    monkeypatch.setattr("pathlib.Path.write_text", read_only)
    with pytest.raises(StoreError, match="Read-only"):
        measure(tiny_copy, [LossAccuracy()], **QUIET)
    assert not list(tiny_copy.root.rglob("*.tmp"))


def test_a_full_disk_while_recording_options_leaves_no_temporary_file(tiny_copy, monkeypatch):
    import workbench.store as st

    real = st._write_atomic

    def full(path, write):
        def half(tmp):
            open(tmp, "w").write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half)

    monkeypatch.setattr(st, "_write_atomic", full)
    with pytest.raises(StoreError, match="fingerprint.json .*No space left.*the disk is full"):
        measure(tiny_copy, [LossAccuracy()], **QUIET)
    assert not [f for f in tiny_copy.root.rglob("*") if f.name.endswith(".tmp")]


# --- one writer at a time -----------------------------------------------------------------------------------------------
def _lock_of(root, **holder):
    record = {"pid": os.getppid(), "host": socket.gethostname(), "started": process_start(os.getppid()),
              "token": "t", "job": None, "since": time.time()} | holder
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_NAME).write_text(json.dumps(record))
    return root / LOCK_NAME


def test_a_live_writer_keeps_others_out_and_a_dead_ones_lock_is_taken_over(tiny_copy):
    store = tiny_copy.store
    lock = _lock_of(store.root)  # our parent process: alive
    with pytest.raises(StoreLockedError, match=f"being written by process {os.getppid()} on "):
        measure(tiny_copy, [LossAccuracy()], **QUIET)
    with pytest.raises(StoreLockedError):
        measure(tiny_copy, [LossAccuracy()], wait=0.3, **QUIET)
    assert store.probes() == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_of(store.root, pid=dead.pid, started="1")
    with pytest.warns(StaleLockWarning, match=f"left by process {dead.pid}"):
        measure(tiny_copy, [LossAccuracy()], steps=[0], **QUIET)
    _lock_of(store.root, started="0")  # a live process under that id, but not the one that took the lock
    with pytest.warns(StaleLockWarning):
        measure(tiny_copy, [LossAccuracy()], steps=[0], **QUIET)
    assert not lock.exists() and store.steps("basic") == [0]


def test_a_lock_held_on_another_host_is_respected_and_says_how_to_clear_it(tiny_copy):
    lock = _lock_of(tiny_copy.store.root, host="elsewhere", pid=1)
    with pytest.raises(StoreLockedError, match=f"process 1 on elsewhere.*remove {lock}"):
        measure(tiny_copy, [LossAccuracy()], **QUIET)


def test_the_ranks_of_one_job_are_one_writer(tiny_copy, monkeypatch):
    lock = _lock_of(tiny_copy.store.root, job="job-7")  # made by another rank of job-7
    with pytest.raises(StoreLockedError, match="job job-7"):
        measure(tiny_copy, [LossAccuracy()], steps=[0], **QUIET)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    measure(tiny_copy, [LossAccuracy()], steps=[0], **QUIET)
    assert lock.exists()  # joined, not owned: the rank that made it removes it
    measure(tiny_copy, [LossAccuracy()], steps=[1], job="job-7", **QUIET)
    assert tiny_copy.store.steps("basic") == [0, 1]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's placeholder names no job
    assert job_id() is None and job_id("x") == "x"
    monkeypatch.setenv("WORKBENCH_JOB_ID", "j2")
    assert job_id() == "j2"


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    with StoreLock(tmp_path) as outer:
        with StoreLock(tmp_path):
            pass
        assert outer.path.exists()
    assert not outer.path.exists()


SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    from workbench import LossAccuracy, Run, measure

    torch.set_num_threads(1)

    class Slow(LossAccuracy):
        def measure(self, cap, ctx):
            time.sleep(float(sys.argv[2]))
            return super().measure(cap, ctx)

    measure(Run.from_folder(sys.argv[1]), [Slow()], progress=False)
    print("done")
""")


@pytest.mark.slow
def test_two_processes_one_store(tiny_copy, tmp_path):
    """A second process is refused while the first writes, waits with wait=True, and is then refused for its
    other options; a writer killed with SIGKILL leaves a stale lock that the next one takes over."""
    script = tmp_path / "writer.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    store = tiny_copy.store
    lock = store.root / LOCK_NAME
    first = subprocess.Popen([sys.executable, str(script), str(tiny_copy.root), "0.3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreLockedError, match=f"process {first.pid} "):
        measure(tiny_copy, [LossAccuracy(per_sample=False)], **QUIET)
    with pytest.raises(StoreError, match="per_sample: stored True, now False"):
        measure(tiny_copy, [LossAccuracy(per_sample=False)], wait=True, **QUIET)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out.strip() == "done", err
    assert store.steps("basic") == tiny_copy.steps and store.verify() == []
    done = store.table("basic")

    store.root.joinpath("basic").rename(tmp_path / "kept")
    killed = subprocess.Popen([sys.executable, str(script), str(tiny_copy.root), "0.5"], env=env)
    while len(store.steps("basic")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert lock.exists()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        measure(tiny_copy, [LossAccuracy()], **QUIET)
    assert any(issubclass(w.category, StaleLockWarning) for w in seen)
    assert store.table("basic").equals(done) and not lock.exists() and store.verify() == []
