"""Measures of forgetting and its predictors, as pure functions (docs/probes.md, "Forgetting"; Zhang, Choshen
& Andreas, arXiv 2409.02228).

:func:`forget_gap` (accuracy − chance), :func:`forget_ratio` ((acc_ft − acc_forget) / (acc_ft − chance); with
flipped labels complete forgetting is accuracy 0, not chance), :func:`forget_matrix` (forget task A, measure
task B). Predictors of the ratio: initial confidence in the right answer against the distractor
(:func:`relative_confidence`) and representation variability, the trace of the covariance of the last-token
hidden state at a layer (:func:`representation_variability`, fifth-to-last layer in the study), correlated
across tasks with :func:`workbench.stats.correlation`.
"""

from __future__ import annotations

import torch

from workbench.errors import InputError


def _acc(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if bool(torch.isnan(t).any()) or bool(((t < 0) | (t > 1)).any()):
        raise InputError(f"{name} must be accuracies in [0, 1]; got {x}")
    return t


def _out(t: torch.Tensor, like) -> float | torch.Tensor:
    return float(t) if t.dim() == 0 and not isinstance(like, torch.Tensor) else t


def forget_gap(acc, chance: float = 0.5):
    """How far above chance an accuracy still is: ``acc − chance`` (0: forgotten, to chance)."""
    return _out(_acc(acc, "acc") - chance, acc)


def forget_ratio(acc_ft, acc_forget, chance: float = 0.5, flipped: bool = False):
    """Share of the fine-tuned model's margin over chance that forgetting removed:
    ``(acc_ft − acc_forget) / (acc_ft − chance)``. 1: down to chance; 0: nothing forgotten; above 1: below
    chance. With ``flipped=True`` (training on flipped labels) complete forgetting means learning the
    flipped labels, accuracy 0, so the floor is 0 instead of chance: 1 is every answer flipped, 0.5 chance.

    Elementwise on tensors; NaN where ``acc_ft`` equals the floor (nothing to forget).
    """
    ft, fo = _acc(acc_ft, "acc_ft"), _acc(acc_forget, "acc_forget")
    floor = 0.0 if flipped else chance
    denom = ft - floor
    ratio = torch.where(denom.abs() > 1e-12, (ft - fo) / torch.where(denom.abs() > 1e-12, denom, 1.0), float("nan"))
    return _out(ratio, acc_ft if isinstance(acc_ft, torch.Tensor) else acc_forget)


def forget_matrix(acc_ft, acc_after, chance: float = 0.5, flipped: bool = False) -> torch.Tensor:
    """The task × task matrix: ``M[a, b]`` is the forget ratio on task b after forgetting task a.

    acc_ft: [T] accuracy of the fine-tuned model on each task; acc_after: [T, T], row a = accuracies on
    every task after forgetting task a.
    """
    ft, after = _acc(acc_ft, "acc_ft"), _acc(acc_after, "acc_after")
    if ft.dim() != 1 or after.shape != (ft.shape[0], ft.shape[0]):
        raise InputError(f"acc_ft must be [T] and acc_after [T, T]; got {tuple(ft.shape)} and {tuple(after.shape)}")
    return forget_ratio(ft[None, :].expand_as(after), after, chance=chance, flipped=flipped)


def relative_confidence(option_probs, labels) -> torch.Tensor:
    """Confidence in the right answer against the distractor(s): p(right) / Σ p(options), per sample."""
    p = torch.as_tensor(option_probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    if p.dim() != 2 or y.shape != (p.shape[0],):
        raise InputError(
            f"option_probs must be [samples, options] and labels [samples]; got {tuple(p.shape)}, {tuple(y.shape)}"
        )
    if bool(((y < 0) | (y >= p.shape[1])).any()):
        raise InputError(f"labels must index the {p.shape[1]} options (0..{p.shape[1] - 1})")
    return p.gather(1, y[:, None])[:, 0] / p.sum(1).clamp_min(1e-300)


def representation_variability(hidden) -> float:
    """Trace of the covariance of hidden states [samples, dim] (the sum of per-dimension variances)."""
    h = torch.as_tensor(hidden, dtype=torch.float64)
    if h.dim() != 2 or h.shape[0] < 2:
        raise InputError(f"hidden must be [samples, dim] with at least 2 samples; got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise InputError("hidden holds NaN or infinite values; capture again in float32")
    return float(h.var(0, unbiased=True).sum())


__all__ = ["forget_gap", "forget_matrix", "forget_ratio", "relative_confidence", "representation_variability"]
