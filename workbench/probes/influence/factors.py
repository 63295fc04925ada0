"""Curvature factors of tracked weight matrices: covariances, eigenbases, corrected eigenvalues; save/load.

Per block (an ``[out, in]`` weight matrix) the strategies keep:

- ``identity``: nothing.
- ``diagonal``: ``lambda`` = mean over examples of ``G_n ⊙ G_n`` (the Fisher's diagonal).
- ``kfac``: eigenbases of ``A = E[a aᵀ]`` and ``S = E[s sᵀ]`` (means over tokens); the curvature in that basis
  is ``λ_S λ_Aᵀ``.
- ``ekfac``: the same eigenbases and ``lambda`` = mean over examples of ``(Q_Sᵀ G_n Q_A)²``.

Eigendecompositions run in float64. A NaN or infinite covariance, a failed decomposition or a layer that saw
only zero activations raises :class:`~workbench.errors.NumericalError` naming the layer.
A :class:`Factors` saves to a folder as ``factors.safetensors`` + ``factors.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workbench.errors import InputError, NumericalError
from workbench.gradients.tracking import TrackingReport

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FISHERS = ("true", "empirical")
_FORMAT = 1


@dataclass
class Factors:
    """The fitted factors of every tracked block, and how they were fitted."""

    strategy: str
    fisher: str
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    n_examples: int = 0
    n_tokens: dict[str, int] = field(default_factory=dict)
    report: TrackingReport | None = None
    idle: list[str] = field(default_factory=list)  # blocks of experts left out: zero gradient on every document

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")

    @property
    def blocks(self) -> list[str]:
        return list(self.shapes)

    def to(self, device: torch.device | str) -> "Factors":
        moved = {k: {n: t.to(device) for n, t in d.items()} for k, d in self.tensors.items()}
        return Factors(self.strategy, self.fisher, self.modules, self.shapes, moved, self.n_examples,
                       self.n_tokens, self.report, self.idle)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` and ``factors.json`` into ``folder`` (e.g. a run's folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {f"{k}::{n}": t.detach().cpu().contiguous() for k, d in self.tensors.items() for n, t in d.items()}
        meta = {
            "format": _FORMAT, "strategy": self.strategy, "fisher": self.fisher, "modules": self.modules,
            "shapes": {k: list(v) for k, v in self.shapes.items()}, "n_examples": self.n_examples,
            "n_tokens": self.n_tokens, "report": self.report.to_dict() if self.report else None,
            "idle": self.idle,
        }
        # Write to temporary names, then rename, so an interrupted save never leaves half a folder.
        tmp_t, tmp_j = folder / ".factors.safetensors.tmp", folder / ".factors.json.tmp"
        save_file(flat, str(tmp_t))
        tmp_j.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_t, folder / "factors.safetensors")
        os.replace(tmp_j, folder / "factors.json")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> "Factors":
        folder = Path(folder)
        meta_file, tensor_file = folder / "factors.json", folder / "factors.safetensors"
        if not meta_file.exists() or not tensor_file.exists():
            raise InputError(f"{folder} holds no saved factors (factors.json, factors.safetensors); fit and save first")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != _FORMAT:
            raise InputError(f"{folder} holds factors in format {meta.get('format')}; this version reads {_FORMAT}")
        tensors: dict[str, dict[str, torch.Tensor]] = {k: {} for k in meta["shapes"]}
        for name, t in load_file(str(tensor_file), device=str(device)).items():
            key, part = name.rsplit("::", 1)
            tensors[key][part] = t
        report = TrackingReport.from_dict(meta["report"]) if meta.get("report") else None
        return cls(meta["strategy"], meta["fisher"], meta["modules"], {k: tuple(v) for k, v in meta["shapes"].items()},
                   tensors, meta["n_examples"], meta["n_tokens"], report, meta.get("idle", []))


# --- numerical pieces (pure) ----------------------------------------------------------------------------
def check_finite(t: torch.Tensor, what: str, key: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"the {what} of layer {key!r} holds NaN or infinity: activations or gradients overflowed there. Run "
            "in float32 rather than half precision, check the inputs for NaN, or leave the layer out (modules=)"
        )


def eigen(covariance_sum: torch.Tensor, count, what: str, key) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (float64) of ``covariance_sum / count``, symmetrized.

    A stack [G, d, d] (``count`` [G], ``key`` the G block names) is decomposed in one batched call; the
    checks still name the block at fault.
    """
    keys = [key] if isinstance(key, str) else list(key)
    sums = covariance_sum.reshape(-1, *covariance_sum.shape[-2:])
    counts = torch.as_tensor(count, dtype=torch.float64, device=sums.device).reshape(-1)
    finite = torch.isfinite(sums).flatten(1).all(1)
    usable = finite & (counts > 0) & (sums.abs().flatten(1).sum(1) > 0)
    if not bool(usable.all()):  # one check for the whole stack; the first bad block named
        i = int((~usable).nonzero()[0])
        check_finite(sums[i], f"{what} covariance", keys[i])
        raise NumericalError(
            f"layer {keys[i]!r} saw only zero {what}s over {int(counts[i])} tokens, so it has no curvature to fit: "
            "the layer did not run on these documents or its inputs are all zero. Leave it out (modules=), or, if "
            "that is expected, use strategy='identity' or a larger explicit damping"
        )
    c = covariance_sum.to(torch.float64) / counts.reshape(covariance_sum.shape[:-2] + (1, 1))
    c = 0.5 * (c + c.mT)
    try:
        values, vectors = torch.linalg.eigh(c)
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        raise NumericalError(
            f"the eigendecomposition of the {what} covariance of layer {keys[0] if len(keys) == 1 else keys!r} failed "
            f"({exc}); the matrix is ill-conditioned: fit on more documents, use a larger damping, or leave the layer "
            "out (modules=)"
        ) from exc
    finite = torch.isfinite(values).reshape(len(keys), -1).all(1)
    if not bool(finite.all()):
        bad = keys[int((~finite).nonzero()[0])]
        raise NumericalError(f"the {what} covariance of layer {bad!r} has non-finite eigenvalues; use a larger damping")
    return values, vectors


def curvature(strategy: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-coordinate curvature ``Λ`` [out, in] a strategy divides by (before damping)."""
    if strategy == "kfac":
        return torch.outer(tensors["gradient_eigenvalues"], tensors["activation_eigenvalues"])
    return tensors["lambda"]


def damping_for(strategy: str, tensors: dict[str, torch.Tensor], damping: float | None, key: str) -> float:
    """The damping of one block: ``damping`` if given, else 0.1 × the mean of the block's curvature."""
    if damping is not None:
        if damping < 0:
            raise InputError(f"damping must be >= 0 or None, not {damping}")
        return float(damping)
    lam = curvature(strategy, tensors)
    value = 0.1 * float(lam.to(torch.float64).mean())
    if not value > 0:
        raise NumericalError(
            f"the default damping of layer {key!r} is {value} (0.1 × the mean curvature): the layer has no "
            "curvature in these factors. Pass an explicit damping > 0, or leave the layer out (modules=)"
        )
    return value
