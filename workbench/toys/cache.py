"""Where built-in runs are cached, and how they are built once and reproducibly.

Every built-in run (modular addition, the forgetting study, the language model) lives in
``$WORKBENCH_HOME/runs/<name>-<hash of its settings>`` (default ``~/.cache/workbench``), is built behind a file
lock so that parallel notebooks or test workers build it once, and is trained on one CPU thread: torch's
reductions give different bits with different thread counts, so pinning the count makes a rerun on the same
machine give the same checkpoints (CPUs with other instruction sets still round differently), and a single
thread does not collapse when other processes share the cores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

TRAINING_THREADS = 1


def home() -> Path:
    return Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".cache" / "workbench"))


def quick_from_env(quick: bool | None) -> bool:
    """``quick`` as given, else whether the environment variable ``WORKBENCH_QUICK`` is 1."""
    return os.environ.get("WORKBENCH_QUICK", "0") == "1" if quick is None else quick


def config_folder(cfg, root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``home()/runs/<cfg.name>-<hash of every setting>``."""
    if root is not None:
        return Path(root)
    digest = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return home() / "runs" / f"{cfg.name}-{digest}"


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock beside ``folder`` for the time of the block."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def pinned_threads(n: int = TRAINING_THREADS) -> Iterator[None]:
    """Run the block with torch using ``n`` threads, restoring the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_trained(folder: Path, train: Callable[[], object], retrain: bool = False) -> Path:
    """Run ``train()`` to fill ``folder`` unless it holds a finished run already (or ``retrain``), under the
    folder's lock, so that concurrent callers train once."""
    with locked(folder):
        if retrain or not (folder / "run.json").exists():
            train()
    return folder


def machine() -> str:
    """What a run's bits depend on besides its settings and thread count: the processor, the CPU kernels torch
    picked for it, and torch's version (recorded in each built-in run's run.json)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
