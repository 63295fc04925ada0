import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Tests run on the CPU with a fixed thread count so timings and results do not depend on the machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run_cfg():
    """A built-in run small enough to train in a few seconds (no grokking: for plumbing tests)."""
    from workbench import toys

    return replace(toys.QUICK, p=11, steps=40, n_checkpoints=6, name="tiny", d_model=32, d_expert=32)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_run_cfg):
    from workbench import toys

    folder = tmp_path_factory.mktemp("runs") / "tiny"
    return toys.ensure_run(tiny_run_cfg, root=folder, progress=False)


@pytest.fixture(scope="session")
def quick_run():
    """The quick built-in run (trained once into $WORKBENCH_HOME and reused by tests and notebooks)."""
    from workbench import toys

    return toys.ensure_run(quick=True, progress=False)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: for tiny models a second one only adds synchronization."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A copy of the tiny built-in run without its store: to measure, break and repair."""
    import shutil

    from workbench import Run

    dst = tmp_path / tiny_run.root.name
    shutil.copytree(tiny_run.root, dst, ignore=shutil.ignore_patterns("store", "report.html"))
    return Run.from_folder(dst)
