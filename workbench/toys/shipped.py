"""The built-in grokking run as trained on the reference machine, shipped with the package.

Training is reproducible on one machine (one pinned thread gives the same bits every time) but not across
machines: CPUs with other instruction sets round differently, and a grokking run amplifies the difference (the
step where test accuracy reaches 0.95 moves by hundreds of steps). So the package ships the checkpoints of
:data:`workbench.toys.DEMO` trained on the reference machine, and :func:`workbench.toys.ensure_run` installs them
instead of training: every machine measures the same checkpoints, and the README's numbers are the report's.
``workbench train`` (``ensure_run(shipped=False)``) still trains the run from scratch, with the same recipe.

The weights are shipped in float16 (half the size) and installed as float32; each checkpoint's recorded
metrics are those of the float16 weights, so they agree with what a measurement of the installed run gives.
``python -m workbench.toys.shipped`` trains the run and writes the shipped copy.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.toys.train import GrokConfig, building, evaluate_run_weights

#: Where the shipped runs live, one folder per run name.
SHIPPED_ROOT = Path(__file__).with_name("reference")
SHIPPED_DTYPE = torch.float16


def _settings(cfg: GrokConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # as run.json stores them (tuples become lists)


def shipped_folder(cfg: GrokConfig, root: Path = SHIPPED_ROOT) -> Path | None:
    """The shipped run trained with exactly ``cfg``, or None when the package ships none."""
    folder = root / cfg.name
    info = folder / "run.json"
    if not info.exists() or json.loads(info.read_text()).get("training") != _settings(cfg):
        return None
    return folder


def is_shipped_copy(folder: Path) -> bool:
    """Whether ``folder`` holds a run installed from the shipped copy (not trained here)."""
    info = folder / "run.json"
    return info.exists() and "shipped" in json.loads(info.read_text())


def install(source: Path, folder: Path) -> Path:
    """Copy the shipped run ``source`` to ``folder`` (through a temporary folder), weights as float32."""
    with building(folder) as tmp:
        for item in sorted(source.iterdir()):
            if item.is_dir():
                (tmp / item.name).mkdir()
                state = {k: v.float() for k, v in load_file(item / "model.safetensors").items()}
                save_file(state, tmp / item.name / "model.safetensors", metadata={"format": "pt"})
                shutil.copy(item / "meta.json", tmp / item.name / "meta.json")
            else:
                shutil.copy(item, tmp / item.name)
    return folder


def ship(trained: Path, out: Path) -> Path:
    """Write the shipped copy of the trained run folder ``trained`` to ``out``: weights rounded to float16,
    metrics re-measured on the rounded weights, and a ``shipped`` note in run.json saying where it was trained
    and what changed."""
    info = json.loads((trained / "run.json").read_text())
    with building(out) as tmp:
        shutil.copy(trained / "samples.parquet", tmp / "samples.parquet")
        history = []
        for step in info["steps"]:
            name = f"step_{step:06d}"
            state = {k: v.to(SHIPPED_DTYPE) for k, v in load_file(trained / name / "model.safetensors").items()}
            (tmp / name).mkdir()
            save_file(state, tmp / name / "model.safetensors", metadata={"format": "pt"})
            metrics = evaluate_run_weights(info, trained / "samples.parquet", {k: v.float() for k, v in state.items()})
            history.append({"step": step, **metrics})
            (tmp / name / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics}, indent=1))
        info["history"] = history
        info["shipped"] = {
            "dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
            "note": "weights rounded from the float32 training run; metrics measured on the rounded weights",
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
            "processor": _cpu_name(),
        }
        (tmp / "run.json").write_text(json.dumps(info, indent=1))
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:  # pragma: no cover - the maintainers' command, run when the recipe changes
    import tempfile

    from workbench.toys import DEMO
    from workbench.toys.train import train_modular

    with tempfile.TemporaryDirectory() as tmp:
        trained = train_modular(DEMO, Path(tmp) / DEMO.name)
        print(f"shipped: {ship(trained, SHIPPED_ROOT / DEMO.name)}")


if __name__ == "__main__":
    main()
