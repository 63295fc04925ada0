"""Runs: an ordered series of checkpoints of one model, the samples it is measured on, and its store.

A Run comes from
- a built-in run folder (``run.json`` + ``step_NNNNNN/model.safetensors``), see :mod:`workbench.toys`;
- a folder of Hugging Face ``save_pretrained`` checkpoints, one subfolder per step (``step_100``,
  ``checkpoint-100``, ``step100-tokens4B`` ...);
- a hub repo id and a list of revisions (``Run.from_hub("allenai/OLMoE-1B-7B-0924", ["step5000-tokens20B", ...])``);
- a folder of plain state-dict files and a function that builds the model (``Run.from_state_dicts``).

Steps are read from names by one rule (:func:`parse_step`); a name it does not fit is refused, listed, unless
``steps=`` maps it. Checkpoints are loaded lazily, one at a time, and only through safetensors or
``torch.load(weights_only=True)``: code inside a checkpoint never runs. Every load is verified: a weight the
model lacks, a weight the file lacks, or one of another shape raises CorruptCheckpointError naming the file
and the keys, so a checkpoint is never measured with parameters left at their random initialization.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from workbench.checks import number
from workbench.errors import (
    CorruptCheckpointError,
    InputError,
    NoCheckpointsError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
)
from workbench.models import adapter_for
from workbench.models.toy import ToyConfig, ToyMoETransformer
from workbench.samples import SampleSet
from workbench.store import Store

_STEP_WORD = re.compile(r"(?<![a-z])(?:global_step|checkpoint|iteration|step|ckpt|iter)[-_]?(\d+)(?=$|[-_.])", re.I)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_WEIGHT_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES)
#: The rule of parse_step, in the words of an error message.
STEP_RULE = ("a step is the number after step, checkpoint, ckpt, iter, iteration or global_step (optionally joined "
             "by '-' or '_', ended by the name's end or '-', '_', '.'), or a name that is only a number")
#: Config fields that name a model's architecture: equal across a run's checkpoints, and its identity.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_experts",
                     "num_local_experts")


def parse_step(name: str) -> int | None:
    """The training step a checkpoint's name stands for, by one rule: the number right after a step word
    (``step``, ``checkpoint``, ``ckpt``, ``iter``, ``iteration``, ``global_step``) that starts the name or follows
    a non-letter, joined directly or by ``-`` / ``_``, and followed by the end of the name or by ``-``, ``_`` or
    ``.``; or the whole name when it is a number. A weights suffix (``.safetensors``, ``.pt`` ...) is ignored.

    ``step_000100``, ``checkpoint-100``, ``step100-tokens4B``, ``global_step100``, ``iter_0000100``, ``100`` → 100.
    None for names without such a number (``final-v2``, ``run-2024-05-01``, ``model``) or with two different ones:
    those are refused, or mapped with ``steps=``.
    """
    name = Path(name).name
    for suffix in _WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.isdigit():
        return int(name)
    found = {int(m.group(1)) for m in _STEP_WORD.finditer(name)}
    return found.pop() if len(found) == 1 else None


def steps_of(names: Sequence[str], steps: Mapping[str, int] | None, where: str) -> list[int]:
    """The step of each name: ``steps[name]`` where given, else :func:`parse_step`. Names that have no step, and
    keys of ``steps`` that name nothing, are refused, listed."""
    steps = dict(steps or {})
    unknown = sorted(set(steps) - set(names))
    if unknown:
        raise InputError(f"steps= maps {unknown}, which are not checkpoints of {where}; its checkpoints are "
                         f"{sorted(names)}")
    out, bad = [], []
    for n in names:
        s = steps[n] if n in steps else parse_step(n)
        if s is None:
            bad.append(n)
            continue
        s = number(s, f"the step of {n!r}", integer=True)
        if s < 0:
            raise InputError(f"the step of {n!r} is {s}; steps are non-negative")
        out.append(s)
    if bad:
        raise InputError(
            f"cannot tell the step of {bad} in {where}: {STEP_RULE}. Rename them (e.g. step_1000), or map them with "
            f"steps={{{bad[0]!r}: 1000, ...}} (workbench measure --checkpoint-step {bad[0]}=1000)"
        )
    return out


def _unreadable(path: Path, exc: BaseException, what: str = "a checkpoint file") -> CorruptCheckpointError:
    """The error for a checkpoint file that cannot be read, with the fix its cause calls for."""
    if isinstance(exc, PermissionError):
        return CorruptCheckpointError(f"{path} cannot be read: permission denied; make it readable for this user "
                                      f"(chmod a+r)")
    if isinstance(exc, FileNotFoundError):
        return CorruptCheckpointError(f"{path} is missing ({what}); copy it again, or save the checkpoint again")
    return CorruptCheckpointError(f"{path} is not a readable {what} ({exc}); the file is truncated or corrupt: copy "
                                  "or save the checkpoint again")


def check_safetensors(path: Path) -> None:
    """Read a safetensors header; raise CorruptCheckpointError naming the file if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise _unreadable(path, exc, "safetensors file") from exc


def read_config(path: Path) -> dict:
    """A checkpoint's config.json; CorruptCheckpointError naming it when it cannot be read."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc, "JSON config") from exc
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"{path} holds {type(cfg).__name__}, not a config object; save it again")
    return cfg


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch file with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # a header that reads but data that does not
            raise _unreadable(path, exc, "safetensors file") from exc
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
        raise _unreadable(path, exc, "torch checkpoint") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpointError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return obj


def refuse_unfit(where, missing=(), unexpected=(), mismatched=(), errors=()) -> None:
    """Raise CorruptCheckpointError naming ``where`` and the keys when a checkpoint's weights do not fit its
    model: ``missing`` (in the model, not the file: they would stay randomly initialized), ``unexpected`` (in the
    file, not the model), ``mismatched`` (``(key, shape in the file, shape in the model)``)."""
    parts = []
    for what, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            parts.append(f"{len(keys)} {what} key(s) ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    if mismatched:
        shown = [f"{k}: {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in sorted(mismatched)[:4]]
        parts.append(f"{len(mismatched)} key(s) of another shape ({'; '.join(shown)})")
    if errors:
        parts.append(f"errors: {'; '.join(map(str, errors))[:300]}")
    if parts:
        raise CorruptCheckpointError(
            f"{where} does not fit the model it is loaded into (from its config or builder): {', '.join(parts)}. The weights belong to another "
            "architecture or size, or were saved incompletely; a model loaded from them would run with random "
            "parameters. Pair the weights with the config (or builder) they were saved from, or save them again"
        )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where) -> nn.Module:
    """Copy ``state`` into ``model`` after checking that every key is there, expected, and of the model's shape."""
    own = model.state_dict()
    refuse_unfit(where, missing=[k for k in own if k not in state], unexpected=[k for k in state if k not in own],
                 mismatched=[(k, state[k].shape, v.shape) for k, v in own.items() if k in state
                             and tuple(state[k].shape) != tuple(v.shape)])
    model.load_state_dict(state)
    return model


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
            model = load_weights(self.builder(), load_state_dict_file(self.source), self.source)
        elif self.kind in ("hf", "hub"):
            model = _load_hf(self.source, revision=self.revision, local=self.kind == "hf", **self.hf_kwargs)
        else:
            raise InputError(f"unknown checkpoint kind {self.kind!r}")
        if getattr(model, "hf_device_map", None):  # placed by device_map=...: accelerate moves what it must
            if dtype is not None and model.dtype != dtype:
                raise InputError(f"{self.source} was loaded with a device_map, which places its weights as they load; "
                                 f"give the dtype there too (Run.from_folder(..., device_map=..., torch_dtype={dtype}))")
            return model.eval()
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


def _load_builtin(step_dir: Path) -> nn.Module:
    info = read_config(step_dir.parent / "run.json")
    try:
        model = ToyMoETransformer(ToyConfig.from_dict(info["model"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{step_dir.parent / 'run.json'} does not describe a built-in model ({exc}); "
                                     "train the run again (workbench demo --retrain)") from exc
    files = sorted(step_dir.glob("*.safetensors")) or sorted(
        f for f in step_dir.iterdir() if f.suffix in _PICKLE_SUFFIXES
    )
    if not files:
        raise NoCheckpointsError(f"{step_dir} holds no weights file; train the run again (workbench demo --retrain)")
    return load_weights(model, load_state_dict_file(files[0]), files[0])


def _hf_weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    st = sorted(folder.glob("*.safetensors"))
    other = sorted(f for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    return st, other


def _check_shards(folder: Path) -> Path | None:
    """The index of a sharded checkpoint, after checking that it reads and that every shard it names is there;
    None for an unsharded one."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.exists():
            weight_map = read_config(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CorruptCheckpointError(f"{index} has no weight_map; save the checkpoint again")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).exists():
                    raise CorruptCheckpointError(f"{folder / shard} is missing: {index} names it as a shard of the "
                                                 "checkpoint; copy it again, or save the checkpoint again")
            return index
    return None


@contextmanager
def _no_transformers_progress():
    """transformers' own "Loading weights" bar, off for one load: the measurement loop already shows one bar
    per checkpoint, and a notebook would get one more progress widget per checkpoint loaded."""
    from transformers.utils import logging as hf_logging  # transformers is heavy: imported when a model loads

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_hf(source: str, revision: str | None = None, local: bool = True, **kwargs) -> nn.Module:
    # transformers takes seconds to import: only when a Hugging Face checkpoint is loaded
    from transformers import AutoConfig, AutoModelForCausalLM

    use_safetensors = None
    where = f"{source} (revision {revision})" if not local else source
    if local:
        folder = Path(source)
        read_config(folder / "config.json")
        index = _check_shards(folder)
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
        files = st or other
        where = str(index) if index else str(files[0]) if len(files) == 1 else str(folder)
    hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token") if k in kwargs}
    try:
        config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False, **hub_kwargs)
    except (ValueError, KeyError) as exc:
        raise UnknownArchitectureError(
            f"transformers does not know the architecture of {source} ({exc}); upgrade transformers, or load "
            "the model yourself and pass it to the probes (remote code is never run)"
        ) from exc
    except OSError as exc:
        if local:
            raise _unreadable(Path(source) / "config.json", exc, "config") from exc
        raise NoCheckpointsError(f"cannot read the config of {where} ({exc}); check the repo id and revision, and "
                                 "that the hub is reachable or the files are in the cache") from exc
    kwargs = {"ignore_mismatched_sizes": True, **kwargs}  # mis-shaped weights are reported below, by name
    try:
        with _no_transformers_progress():
            model, info = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                revision=revision,
                trust_remote_code=False,
                use_safetensors=use_safetensors,
                output_loading_info=True,
                **kwargs,
            )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise UnknownArchitectureError(
                f"{source} is a {config.model_type} model, which has no causal-LM class in transformers; the "
                "workbench measures causal language models"
            ) from exc
        raise
    except OSError as exc:
        if local:
            raise _unreadable(Path(getattr(exc, "filename", None) or source), exc) from exc
        raise NoCheckpointsError(f"cannot load {where} ({exc}); check the repo id and revision, and that the hub "
                                 "is reachable or the files are in the cache") from exc
    refuse_unfit(where, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                 info.get("mismatched_keys", ()), info.get("error_msgs", ()))
    return model


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

    def identity(self) -> dict:
        """The run's model as a store's fingerprint records it: its name (which every table's ``run`` column holds),
        the kind of its checkpoints, and a hash of its architecture (the config fields of
        :data:`ARCHITECTURE_KEYS`, the built-in model's config, or the parameter shapes a builder makes), but not
        its paths, so a run folder may move."""
        first = self.checkpoints[0]
        if first.kind == "builtin":
            arch = self.info.get("model")
        elif first.kind == "hf":
            cfg = read_config(first.path / "config.json")
            arch = {k: cfg.get(k) for k in ARCHITECTURE_KEYS}
        elif first.kind == "state_dict" and first.builder is not None:
            try:
                with torch.device("meta"):  # shapes without allocating the weights
                    arch = {k: list(v.shape) for k, v in first.builder().state_dict().items()}
            except Exception:  # a builder that cannot run on the meta device: its name stands for it
                arch = getattr(first.builder, "__qualname__", None)
        else:  # a hub repo: its id (the run's default name) says it; the config would need a download
            arch = self.info.get("repo_id")
        digest = hashlib.sha1(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return {"name": self.name, "kind": first.kind, "architecture": digest}

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
        rows = [{"step": c.step, **c.metadata().get("metrics", {})} for c in self.checkpoints]
        return pl.DataFrame(rows)

    def tokenizer(self):
        """The tokenizer saved with the first checkpoint (Hugging Face runs)."""
        from transformers import AutoTokenizer  # seconds to import: only when asked for

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
        steps: Mapping[str, int] | None = None,
        **hf_kwargs,
    ) -> "Run":
        """A built-in run folder, or a folder of HF checkpoints (one subfolder per step). Steps are read from the
        subfolders' names (:func:`parse_step`); ``steps`` maps names that do not fit the rule (``{"final-v2":
        5000}``)."""
        folder = Path(path)
        if not folder.is_dir():
            raise NoCheckpointsError(f"{folder} is not a folder; give the folder that holds the checkpoints")
        if (folder / "run.json").exists():
            info = read_config(folder / "run.json")
            dirs = [d for d in sorted(folder.glob("step_*")) if d.is_dir()]
            if not dirs:
                raise NoCheckpointsError(f"built-in run {folder} has no step_* folders; train it again")
            found = steps_of([d.name for d in dirs], steps, folder)
            ckpts = [Checkpoint(step=s, source=str(d), kind="builtin") for s, d in zip(found, dirs)]
            return cls(name or info.get("name", folder.name), ckpts, root=store_root or folder, samples=samples,
                       info=info, folder=folder)
        ckpts = []
        if (folder / "config.json").exists():  # a single HF checkpoint
            ckpts.append(Checkpoint(step=0, source=str(folder), kind="hf", hf_kwargs=hf_kwargs))
        dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and (d / "config.json").exists()]
        orphans = [d for d in sorted(folder.iterdir()) if d.is_dir() and d not in dirs and parse_step(d.name) is not None
                   and any(f.suffix in _WEIGHT_SUFFIXES for f in d.iterdir())]
        if orphans:
            raise CorruptCheckpointError(
                f"{orphans[0] / 'config.json'} is missing: {orphans[0]} holds weights but no config.json, so its "
                "architecture is unknown; copy the config it was saved with into it"
                + (f" (the same holds for {', '.join(d.name for d in orphans[1:])})" if len(orphans) > 1 else "")
            )
        found = steps_of([d.name for d in dirs], steps, folder)
        ckpts += [Checkpoint(step=s, source=str(d), kind="hf", hf_kwargs=hf_kwargs) for s, d in zip(found, dirs)]
        if not ckpts:
            loose = [f.name for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES]
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
        steps: Sequence[int] | Mapping[str, int] | None = None,
        samples: SampleSet | None = None,
        store_root: str | os.PathLike | None = None,
        name: str | None = None,
        **hf_kwargs,
    ) -> "Run":
        """Revisions of a hub model (``step1000`` for Pythia, ``step5000-tokens20B`` for OLMoE). Weights download
        on first load into the Hugging Face cache; steps are parsed from the revision names unless given (one per
        revision, or a mapping for the names the rule does not fit)."""
        if not revisions:
            raise NoCheckpointsError(f"no revisions given for {repo_id}; list the branches or tags to load")
        revisions = list(revisions)
        if steps is None or isinstance(steps, Mapping):
            steps = steps_of(revisions, steps, repo_id)
        if len(steps) != len(revisions):
            raise InputError(f"{len(revisions)} revisions but {len(steps)} steps; give one step per revision")
        ckpts = [
            Checkpoint(step=number(s, f"the step of revision {r!r}", integer=True), source=repo_id, kind="hub",
                       revision=r, hf_kwargs=hf_kwargs)
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
        steps: Sequence[int] | Mapping[str, int] | None = None,
        samples: SampleSet | None = None,
        name: str | None = None,
        store_root: str | os.PathLike | None = None,
    ) -> "Run":
        """Plain state-dict files (safetensors, or torch files loaded with ``weights_only=True``) and a
        function that builds an empty model of the right shape. Steps are parsed from the file names unless
        given: one per file, or a mapping of file names to steps for the names the rule does not fit."""
        if isinstance(files, (str, os.PathLike)) and Path(files).is_dir():
            folder = Path(files)
            files = sorted(f for f in folder.iterdir() if f.suffix in _WEIGHT_SUFFIXES)
        else:
            files = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
            folder = files[0].parent if files else Path(".")
        if not files:
            raise NoCheckpointsError(f"no *.safetensors or *.pt files in {folder}")
        if steps is None or isinstance(steps, Mapping):
            steps = steps_of([f.name for f in files], steps, folder)
        if len(steps) != len(files):
            raise InputError(f"{len(files)} files but {len(steps)} steps; give one step per file")
        ckpts = [Checkpoint(step=number(s, f"the step of {f.name!r}", integer=True), source=str(f), kind="state_dict",
                            builder=build) for s, f in zip(steps, files)]
        return cls(name or folder.name, ckpts, root=store_root or folder, samples=samples, folder=folder)


def _check_same_architecture(folders: Sequence[Path]) -> None:
    keys = ARCHITECTURE_KEYS
    seen = None
    for f in folders:
        cfg = read_config(f / "config.json")
        sig = {k: cfg.get(k) for k in keys}
        if seen is None:
            seen = (f, sig)
        elif sig != seen[1]:
            diff = {k: (seen[1][k], sig[k]) for k in keys if seen[1][k] != sig[k]}
            raise InputError(
                f"checkpoints {seen[0].name} and {f.name} are of different architectures ({diff}); a run is "
                "one model's checkpoints: split them into separate runs"
            )


def spread_steps(steps: Sequence[int], n: int) -> tuple[int, ...]:
    """At most ``n`` of ``steps``, evenly spread over their order (the first and the last included): the
    checkpoints a costly measurement measures or lays out when it does not take them all."""
    if n < 1:
        raise InputError(f"a subset of checkpoints needs at least 1, not {n}")
    steps = list(steps)
    if len(steps) <= n:
        return tuple(steps)
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, n)).astype(int))
    return tuple(steps[i] for i in picks)


def count_blocks(run: Run) -> int:
    """The number of blocks of a run's model, from its config when it says, else by loading one checkpoint."""
    n = (run.info.get("model") or {}).get("n_layers")
    if n:
        return int(n)
    first = run.checkpoints[0]
    if first.kind in ("hf", "hub"):
        try:
            # transformers takes seconds to import: only for runs of its checkpoints
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(first.source, revision=first.revision)
            n = getattr(cfg.get_text_config(), "num_hidden_layers", None)
            if n:
                return int(n)
        except (OSError, ValueError):
            pass  # fall back to loading the model
    model = first.load()
    try:
        return len(adapter_for(model).blocks(model))
    finally:
        del model
        release()
