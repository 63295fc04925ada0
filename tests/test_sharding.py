"""measure() under torch.distributed: 2 gloo ranks on the CPU write the tables one process writes.

Three checkpoints on two ranks exercise both modes in one call: the first two go one to each rank
(checkpoint-sharded), the third is shared (sample-sharded: each rank captures every other batch, rank 0 gathers
and writes). A rank killed mid-way leaves the parts already written whole, and a rerun completes the rest.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from polars.testing import assert_frame_equal

from workbench import Run, measure
from workbench.capture import CaptureSpec
from workbench.measure import setting
from workbench.probes.basic import LossAccuracy
from workbench.probes.pathways import RoutingPathways
from workbench.probes.routing import RoutingStats
from workbench.sharding import plan

# Two ranks in spawned processes start in ~5 s each: every scenario shares the one spawn where it can.

#: Capture batches of at most this many padded tokens: several batches per checkpoint, so that in the
#: sample-sharded mode rank 1 captures rows of its own and rank 0 gathers them.
TOKENS = 64


@dataclass(frozen=True)
class CountedPathways(RoutingPathways):
    """Pathways (which has an across-checkpoint table) that leaves a file per finalize call, and a routing
    capture with a hidden state too, so gathered hidden states are compared as well."""

    marks: str = setting("")
    die_at: int = setting(-1)  # rank 1 exits at this step, once the first step's part is written

    def spec(self) -> CaptureSpec:
        return super().spec().union(CaptureSpec(hidden_layers=(-1,)))

    def measure(self, cap, ctx):
        if ctx.step == self.die_at and os.environ.get("RANK") == "1":
            for _ in range(600):  # die after the other rank's first part is written, so a part survives us
                if set(ctx.store.steps("pathways")) - {self.die_at}:
                    break
                time.sleep(0.05)
            os._exit(3)
        df = super().measure(cap, ctx)
        hidden = pl.DataFrame({"sample_id": cap.sample_ids, "metric": "hidden_norm",
                               "value": cap.hidden[max(cap.hidden)].norm(dim=1).double().numpy()})
        return pl.concat([df, hidden], how="diagonal_relaxed")

    def finalize(self, store, run):
        Path(self.marks, f"finalize.{os.getpid()}.{uuid.uuid4().hex}").touch()
        return super().finalize(store, run)


def _measurements(marks: str, die_at: int = -1) -> list:
    return [LossAccuracy(), RoutingStats(), CountedPathways(max_pairs=20, marks=marks, die_at=die_at)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, jobs: list[tuple[str, int]], marks: str, steps: list[int]) -> None:
    """Measure each (run folder, step at which rank 1 dies) in turn, as rank ``rank`` of 2."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for folder, die_at in jobs:
            measure(Run.from_folder(folder), _measurements(marks, die_at), steps=steps, device="cpu", progress=False,
                    token_budget=TOKENS)
    finally:
        dist.destroy_process_group()


def _two_ranks(jobs: list[tuple[Path, int]], marks: Path, steps: list[int]) -> None:
    marks.mkdir(exist_ok=True)
    jobs = [(str(folder), die_at) for folder, die_at in jobs]
    mp.spawn(_worker, args=(_free_port(), jobs, str(marks), steps), nprocs=2, join=True)


def _tables(store) -> dict[str, pl.DataFrame]:
    return {(name, final): store.table(name, final=final) for name in ("basic", "routing", "pathways")
            for final in (False, True)}


def _assert_same(two, one) -> None:
    for key, table in one.items():
        # Each batch is computed as a lone process computes it; a CPU kernel may still split its work by
        # thread count differently, so values agree to float32 rounding, not always bit for bit.
        assert_frame_equal(two[key], table, check_exact=False, rel_tol=1e-5, abs_tol=1e-6)


@pytest.fixture
def runs(tiny_run, tmp_path):
    """Three copies of the tiny run without stores: one process, two ranks, two ranks killed and resumed."""
    out = []
    for name in ("one", "two", "killed"):
        dst = tmp_path / name / tiny_run.root.name
        shutil.copytree(tiny_run.root, dst, ignore=shutil.ignore_patterns("store", "report.html"))
        out.append(dst)
    return out


def test_plan_gives_whole_rounds_to_ranks_and_shares_the_rest():
    todo = [0, 10, 20, 30, 40]
    assert plan(todo, 0, 2) == plan(todo, 0, 2)
    assert (plan(todo, 0, 2).own, plan(todo, 1, 2).own) == ([0, 20], [10, 30])
    assert plan(todo, 0, 2).shared == plan(todo, 1, 2).shared == [40]
    assert plan(todo, 2, 4).own == [20] and plan(todo, 0, 4).shared == [40]
    assert plan(todo[:1], 1, 2) == plan([0], 1, 2) and plan([0], 1, 2).own == []  # one checkpoint: shared
    assert plan(todo, 0, 1).own == todo and plan(todo, 0, 1).shared == []


def test_two_gloo_ranks_equal_one_process_and_resume_after_a_killed_rank(runs, tmp_path):
    one, two, killed = runs
    steps = Run.from_folder(one).steps[-3:]  # two checkpoint-sharded, one sample-sharded

    ref = Run.from_folder(one)
    measure(ref, _measurements(str(tmp_path)), steps=steps, device="cpu", progress=False, token_budget=TOKENS)
    for f in tmp_path.glob("finalize.*"):
        f.unlink()
    expected = _tables(ref.store)
    assert expected[("pathways", True)].height > 0

    # One spawn (processes start in seconds): a whole measurement, then one whose rank 1 dies at its own
    # checkpoint (the second) once rank 0 has written the first.
    marks = tmp_path / "marks"
    with pytest.raises(mp.ProcessExitedException):
        _two_ranks([(two, -1), (killed, steps[1])], marks, steps)
    _assert_same(_tables(Run.from_folder(two).store), expected)
    assert len(list(marks.glob("finalize.*"))) == 1  # the across-checkpoint step ran once, on rank 0
    assert not (two / "store" / ".writer.lock").exists()

    store = Run.from_folder(killed).store
    assert store.steps("pathways") == [steps[0]]
    left = _tables(store)
    for name in ("basic", "routing", "pathways"):  # what was written is whole and right
        assert set(store.steps(name)) <= set(steps[:2])
        _assert_same({0: left[(name, False)]}, {0: expected[(name, False)].filter(
            pl.col("step").is_in(store.steps(name)))})
    assert not store.has_final("pathways")
    # What the dead ranks leave is at most their lock and temporary files, which a rerun takes over.
    assert all(p.repairable for p in store.verify())
    marks = tmp_path / "marks_rerun"
    _two_ranks([(killed, -1)], marks, steps)
    _assert_same(_tables(Run.from_folder(killed).store), expected)
    assert len(list(marks.glob("finalize.*"))) == 1
    assert not (killed / "store" / ".writer.lock").exists()


def test_torchrun_runs_the_measure_command_as_one_job(runs, tmp_path):
    import subprocess
    import sys

    one, two, _ = runs
    steps = Run.from_folder(one).steps[-3:]
    measure(Run.from_folder(one), ["basic"], steps=steps, device="cpu", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "workbench",
           "measure", str(two), "--probe", "basic", "--device", "cpu"] + [f"--step={s}" for s in steps]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "WORKBENCH_JOB_ID": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("store: ") == 1  # said by rank 0 only
    _assert_same({0: Run.from_folder(two).store.table("basic")}, {0: Run.from_folder(one).store.table("basic")})
    assert not (two / "store" / ".writer.lock").exists()
