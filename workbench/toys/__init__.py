"""Built-in runs: small tasks and models that show the memorization-to-generalization transition on a CPU.

``ensure_run()`` returns the built-in grokking run, training it once into ``$WORKBENCH_HOME/runs`` (default
``~/.cache/workbench/runs``) when it is not there; later calls, notebooks and tests reuse it. The folder name
carries a hash of the settings, so a changed setting trains a new run instead of reusing a stale one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.runs import Run
from workbench.toys.cache import config_folder, ensure_trained, home, pinned_threads, quick_from_env
from workbench.toys.modular import modular_addition
from workbench.toys.train import GrokConfig, checkpoint_steps, train_modular

#: The run ``make demo`` trains (settings and what they gave are in the README).
DEMO = GrokConfig()
#: A short run for tests and quick notebook execution: the demo run's first 600 steps (the same warmup and
#: constant rate, so the same trajectory): train accuracy comes near 0.99 and test accuracy climbs part of the way.
QUICK = replace(DEMO, steps=600, schedule="constant", hold=0, n_checkpoints=12, name="modular-moe-quick")


def run_folder(cfg: GrokConfig, root: str | os.PathLike | None = None) -> Path:
    return config_folder(cfg, root)


def ensure_run(
    config: GrokConfig | None = None,
    *,
    quick: bool | None = None,
    root: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
):
    """The built-in run as a :class:`workbench.Run`, trained first if needed.

    ``quick`` (default: the environment variable ``WORKBENCH_QUICK`` is set to 1) picks :data:`QUICK`.
    """
    if config is None:
        config = QUICK if quick_from_env(quick) else DEMO
    folder = config_folder(config, root)
    ensure_trained(folder, lambda: train_modular(config, folder, progress=progress), retrain)
    return Run.from_folder(folder)


__all__ = [
    "DEMO",
    "QUICK",
    "GrokConfig",
    "ToyConfig",
    "ToyMoETransformer",
    "checkpoint_steps",
    "ensure_run",
    "home",
    "modular_addition",
    "pinned_threads",
    "run_folder",
    "train_modular",
]
