"""Runs: an ordered series of checkpoints of one model, the samples it is measured on, and its store.

A Run comes from
- a built-in run folder (``run.json`` + ``step_NNNNNN/model.safetensors``), see :mod:`workbench.toys`;
- a folder of Hugging Face ``save_pretrained`` checkpoints, one subfolder per step (``step_100``,
  ``checkpoint-100``, ``step100-tokens4B`` ...);
- a hub repo id and a list of revisions (``Run.from_hub("allenai/OLMoE-1B-7B-0924", ["step5000-tokens20B", ...])``);
- a folder of plain state-dict files and a function that builds the model (``Run.from_state_dicts``).

Checkpoints are loaded lazily, one at a time, and only through safetensors or
``torch.load(weights_only=True)``: code inside a checkpoint never runs.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workbench.errors import (
    CorruptCheckpointError,
    InputError,
    NoCheckpointsError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from workbench.samples import SampleSet
from workbench.store import Store

_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z])(?:global_step|step|checkpoint|ckpt|iter|iteration)[-_]?(\d+)", re.I),
    re.compile(r"(\d+)"),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_step(name: str) -> int | None:
    """The training step a checkpoint name stands for: ``step_000100`` → 100, ``checkpoint-2000`` → 2000,
    ``step5000-tokens20B`` → 5000; None when the name holds no number."""
    for pat in _STEP_PATTERNS:
        m = pat.search(name)
        if m:
            return int(m.group(1))
    return None


def check_safetensors(path: Path) -> None:
    """Read a safetensors header; raise CorruptCheckpointError naming the file if it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file ({exc}); the file is truncated or corrupt: "
            "copy or save the checkpoint again"
        ) from exc


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch file with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files in the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects that only an unsafe load could rebuild ({exc}). The workbench "
            "never runs code from a checkpoint: re-save it as safetensors (safetensors.torch.save_file) or "
            "as a plain state dict of tensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CorruptCheckpointError(f"{path} cannot be read as a torch checkpoint ({exc}); save it again") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return obj


def release(model: nn.Module | None = None) -> None:
    """Drop a loaded model's memory (host and device)."""
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- checkpoints ---------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One checkpoint of a run. ``load()`` builds the model; nothing is read before."""

    step: int
    source: str
    kind: str  # "builtin" | "hf" | "hub" | "state_dict"
    revision: str | None = None
    builder: Callable[[], nn.Module] | None = field(default=None, repr=False)
    hf_kwargs: dict = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return Path(self.source)

    def metadata(self) -> dict:
        """What the checkpoint says about itself (built-in runs: step and metrics)."""
        meta = self.path / "meta.json" if self.kind == "builtin" else None
        return json.loads(meta.read_text()) if meta is not None and meta.exists() else {"step": self.step}

    def load(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        if self.kind == "builtin":
            model = _load_builtin(self.path)
        elif self.kind == "state_dict":
            model = self.builder()
            model.load_state_dict(load_state_dict_file(self.source))
        elif self.kind in ("hf", "hub"):
            model = _load_hf(self.source, revision=self.revision, local=self.kind == "hf", **self.hf_kwargs)
        else:
            raise InputError(f"unknown checkpoint kind {self.kind!r}")
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


def _load_builtin(step_dir: Path) -> nn.Module:
    from workbench.models.toy import ToyConfig, ToyMoETransformer

    info = json.loads((step_dir.parent / "run.json").read_text())
    model = ToyMoETransformer(ToyConfig.from_dict(info["model"]))
    files = sorted(step_dir.glob("*.safetensors")) or sorted(
        f for f in step_dir.iterdir() if f.suffix in _PICKLE_SUFFIXES
    )
    if not files:
        raise NoCheckpointsError(f"{step_dir} holds no weights file; train the run again (workbench demo --retrain)")
    state = load_state_dict_file(files[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"{files[0]} does not fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "the checkpoint belongs to another run or config"
        )
    return model


def _hf_weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    st = sorted(folder.glob("*.safetensors"))
    other = sorted(f for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    return st, other


def _load_hf(source: str, revision: str | None = None, local: bool = True, **kwargs) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    use_safetensors = None
    if local:
        folder = Path(source)
        st, other = _hf_weight_files(folder)
        if st:
            for f in st:
                check_safetensors(f)
            use_safetensors = True
        elif other:
            for f in other:  # fail before transformers does, with our message; cheap with mmap
                load_state_dict_file(f)
            use_safetensors = False
        else:
            raise NoCheckpointsError(f"{folder} has a config.json but no weights (*.safetensors or *.bin)")
    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token") if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False, **hub_kwargs)
    except (ValueError, KeyError) as exc:
        raise UnknownArchitectureError(
            f"transformers does not know the architecture of {source} ({exc}); upgrade transformers, or load "
            "the model yourself and pass it to the probes (remote code is never run)"
        ) from exc
    try:
        return AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            revision=revision,
            trust_remote_code=False,
            use_safetensors=use_safetensors,
            **kwargs,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UnknownArchitectureError(
                f"{source} is a {config.model_type} model, which has no causal-LM class in transformers; the "
                "workbench measures causal language models"
            ) from exc
        raise


# --- runs ----------------------------------------------------------------------------------------------------
class Run:
    """An ordered series of checkpoints of one model, its samples and its store."""

    def __init__(
        self,
        name: str,
        checkpoints: Sequence[Checkpoint],
        *,
        root: str | os.PathLike,
        samples: SampleSet | None = None,
        info: dict | None = None,
        folder: str | os.PathLike | None = None,
    ):
        if not checkpoints:
            raise NoCheckpointsError(f"run {name!r} has no checkpoints")
        steps = [c.step for c in checkpoints]
        if len(set(steps)) != len(steps):
            dup = sorted({s for s in steps if steps.count(s) > 1})
            raise InputError(f"run {name!r} has several checkpoints for step(s) {dup}; give each step one checkpoint")
        self.name = name
        self.checkpoints = sorted(checkpoints, key=lambda c: c.step)
        self.root = Path(root)  # where the store and reports go
        self.folder = Path(folder) if folder is not None else self.root  # where the run's own files are
        self._samples = samples
        self.info = info or {}

    def __repr__(self) -> str:
        s = self.steps
        return f"Run({self.name!r}, {len(s)} checkpoints, steps {s[0]}..{s[-1]}, root={str(self.root)!r})"

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def checkpoint(self, step: int) -> Checkpoint:
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise InputError(f"run {self.name!r} has no checkpoint at step {step}; its steps are {self.steps}")

    @property
    def samples(self) -> SampleSet:
        if self._samples is None:
            f = self.folder / "samples.parquet"
            if f.exists():
                self._samples = SampleSet.load(f)
            else:
                raise InputError(
                    f"run {self.name!r} has no samples; pass samples= when making the run, or set run.samples "
                    "(e.g. SampleSet.from_texts(tokenizer, texts, groups=...))"
                )
        return self._samples

    @samples.setter
    def samples(self, value: SampleSet) -> None:
        self._samples = value

    @property
    def store(self) -> Store:
        return Store(self.root / "store", run=self.name)

    def models(
        self, steps: Sequence[int] | None = None, device=None, dtype=None
    ) -> Iterator[tuple[Checkpoint, nn.Module]]:
        """Yield (checkpoint, model) one at a time; each model is released before the next loads."""
        for ckpt in self.checkpoints:
            if steps is not None and ckpt.step not in steps:
                continue
            model = ckpt.load(device=device, dtype=dtype)
            try:
                yield ckpt, model
            finally:
                del model
                release()

    def metrics(self):
        """Training metrics the built-in run recorded at each checkpoint, as a polars table."""
        import polars as pl

        rows = [{"step": c.step, **c.metadata().get("metrics", {})} for c in self.checkpoints]
        return pl.DataFrame(rows)

    def tokenizer(self):
        from transformers import AutoTokenizer

        first = self.checkpoints[0]
        return AutoTokenizer.from_pretrained(first.source, revision=first.revision)

    # --- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        samples: SampleSet | None = None,
        name: str | None = None,
        store_root: str | os.PathLike | None = None,
        **hf_kwargs,
    ) -> "Run":
        """A built-in run folder, or a folder of HF checkpoints (one subfolder per step)."""
        folder = Path(path)
        if not folder.is_dir():
            raise NoCheckpointsError(f"{folder} is not a folder; give the folder that holds the checkpoints")
        if (folder / "run.json").exists():
            info = json.loads((folder / "run.json").read_text())
            ckpts = [
                Checkpoint(step=parse_step(d.name), source=str(d), kind="builtin")
                for d in sorted(folder.glob("step_*"))
                if d.is_dir()
            ]
            if not ckpts:
                raise NoCheckpointsError(f"built-in run {folder} has no step_* folders; train it again")
            return cls(name or info.get("name", folder.name), ckpts, root=store_root or folder, samples=samples,
                       info=info, folder=folder)
        ckpts = []
        if (folder / "config.json").exists():  # a single HF checkpoint
            ckpts.append(Checkpoint(step=0, source=str(folder), kind="hf", hf_kwargs=hf_kwargs))
        for d in sorted(folder.iterdir()):
            if d.is_dir() and (d / "config.json").exists():
                step = parse_step(d.name)
                if step is None:
                    raise InputError(
                        f"cannot tell the step of checkpoint folder {d.name!r}; name it with its step, "
                        "e.g. step_1000 or checkpoint-1000"
                    )
                ckpts.append(Checkpoint(step=step, source=str(d), kind="hf", hf_kwargs=hf_kwargs))
        if not ckpts:
            loose = [f.name for f in folder.iterdir() if f.suffix in (".safetensors", *_PICKLE_SUFFIXES)]
            hint = (
                f" It holds weight files ({', '.join(loose[:3])}) without configs: use Run.from_state_dicts with "
                "a function that builds the model."
                if loose
                else ""
            )
            raise NoCheckpointsError(
                f"no checkpoints in {folder}: expected run.json (a built-in run) or subfolders with a "
                f"config.json (Hugging Face save_pretrained), one per step.{hint}"
            )
        _check_same_architecture([Path(c.source) for c in ckpts])
        return cls(name or folder.name, ckpts, root=store_root or folder, samples=samples)

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        revisions: Sequence[str],
        *,
        steps: Sequence[int] | None = None,
        samples: SampleSet | None = None,
        store_root: str | os.PathLike | None = None,
        name: str | None = None,
        **hf_kwargs,
    ) -> "Run":
        """Revisions of a hub model (``step1000`` for Pythia, ``step5000-tokens20B`` for OLMoE). Weights download
        on first load into the Hugging Face cache; steps are parsed from the revision names unless given."""
        if not revisions:
            raise NoCheckpointsError(f"no revisions given for {repo_id}; list the branches or tags to load")
        if steps is None:
            steps = [parse_step(r) for r in revisions]
            bad = [r for r, s in zip(revisions, steps) if s is None]
            if bad:
                raise InputError(f"cannot tell the steps of revisions {bad}; pass steps= explicitly")
        if len(steps) != len(revisions):
            raise InputError(f"{len(revisions)} revisions but {len(steps)} steps; give one step per revision")
        ckpts = [
            Checkpoint(step=int(s), source=repo_id, kind="hub", revision=r, hf_kwargs=hf_kwargs)
            for s, r in zip(steps, revisions)
        ]
        root = Path(store_root) if store_root else Path("workbench-runs") / repo_id.replace("/", "--")
        return cls(name or repo_id, ckpts, root=root, samples=samples, info={"repo_id": repo_id})

    @classmethod
    def from_state_dicts(
        cls,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        build: Callable[[], nn.Module],
        *,
        steps: Sequence[int] | None = None,
        samples: SampleSet | None = None,
        name: str | None = None,
        store_root: str | os.PathLike | None = None,
    ) -> "Run":
        """Plain state-dict files (safetensors, or torch files loaded with ``weights_only=True``) and a
        function that builds an empty model of the right shape."""
        if isinstance(files, (str, os.PathLike)) and Path(files).is_dir():
            folder = Path(files)
            files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", *_PICKLE_SUFFIXES))
        else:
            files = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
            folder = files[0].parent if files else Path(".")
        if not files:
            raise NoCheckpointsError(f"no *.safetensors or *.pt files in {folder}")
        steps = list(steps) if steps is not None else [parse_step(f.stem) for f in files]
        if any(s is None for s in steps):
            raise InputError("cannot tell the steps from the file names; pass steps= explicitly")
        ckpts = [Checkpoint(step=s, source=str(f), kind="state_dict", builder=build) for s, f in zip(steps, files)]
        return cls(name or folder.name, ckpts, root=store_root or folder, samples=samples, folder=folder)


def _check_same_architecture(folders: Sequence[Path]) -> None:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_experts", "num_local_experts")
    seen = None
    for f in folders:
        cfg = json.loads((f / "config.json").read_text())
        sig = {k: cfg.get(k) for k in keys}
        if seen is None:
            seen = (f, sig)
        elif sig != seen[1]:
            diff = {k: (seen[1][k], sig[k]) for k in keys if seen[1][k] != sig[k]}
            raise InputError(
                f"checkpoints {seen[0].name} and {f.name} are of different architectures ({diff}); a run is "
                "one model's checkpoints: split them into separate runs"
            )
