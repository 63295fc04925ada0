"""Calibration and discrimination of confidence (docs/probes.md, "Calibration"; Steyvers et al.,
arXiv 2510.05126).

Every answer has a confidence in [0, 1] and a correctness bit. *Calibration* asks whether answers given
with confidence c are right a share c of the time (ECE, MCE, Brier score, NLL, reliability diagram);
*discrimination* asks whether right answers get higher confidence than wrong ones (AUROC, AUPRC, the
pairwise task). Temperature scaling recalibrates logits.

Metric functions take ``conf`` and ``correct`` of shape ``[..., N]`` (leading dimensions are a batch, e.g.
checkpoints or bootstrap resamples) and return one value per batch entry, shape ``[...]`` (a 0-dim tensor
for 1-D input). They run on whatever device the tensors are on, in float64 (float32 on MPS).

scikit-learn has no ECE and its ranking metrics are not batched; torchmetrics bins uniformly only; so
the metrics are written here over sorted tensors and ``scatter_add``, and the tests check them against
scikit-learn on random cases with ties.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from workbench.checks import is_integer
from workbench.errors import InputError

BINNINGS = ("uniform", "quantile")


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the input (AUROC when every answer is right or every one wrong); the
    result holds NaN where that happened."""


# --- input checks (at the boundary only) ------------------------------------------------------------------
def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_float(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if device is not None:
            t = t.to(device)
    else:
        try:
            # Straight to float64: a Python float must not pass through float32 on the way.
            dev = torch.device(device) if device is not None else torch.device("cpu")
            t = torch.as_tensor(x, dtype=_float_dtype(dev), device=dev)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{name} must be a tensor or a sequence of numbers, not {type(x).__name__} ({exc})"
            ) from exc
    if t.is_complex():
        raise InputError(f"{name} must hold real numbers, not complex ones")
    return t.to(_float_dtype(t.device))


def _check_unit_interval(t: torch.Tensor, name: str, what: str) -> None:
    # One pass in the common case: NaN fails both comparisons, so it is caught here too.
    if bool(((t >= 0) & (t <= 1)).all()):
        return
    nan = torch.isnan(t)
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        where = first[0] if len(first) == 1 else first
        raise InputError(
            f"{name} holds NaN at {int(nan.sum())} position(s) (first at index {where}); "
            "drop those answers or fix what produced them"
        )
    bad = (t < 0) | (t > 1)
    raise InputError(
        f"{name} must lie in [0, 1] ({what}); {int(bad.sum())} value(s) fall outside, from {float(t.min()):g} "
        f"to {float(t.max()):g}. Pass probabilities (softmax outputs; percentages divided by 100)"
    )


def _check_binary(t: torch.Tensor, name: str) -> None:
    if bool(((t == 0) | (t == 1)).all()):
        return
    _check_unit_interval(t, name, "1 = right, 0 = wrong")
    raise InputError(
        f"{name} must be 0 or 1 (wrong or right) for this metric; it holds other values such as "
        f"{float(t[(t != 0) & (t != 1)][0]):g}. Threshold fractional scores first (e.g. accuracy == 1)"
    )


def _inputs(conf, correct, *, binary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float tensors of one broadcast shape [..., N]."""
    conf = _as_float(conf, "conf")
    correct = _as_float(correct, "correct", conf.device)
    if conf.ndim == 0 or correct.ndim == 0:
        raise InputError("conf and correct must be sequences with one value per answer, not single numbers")
    if conf.shape[-1] != correct.shape[-1]:
        raise InputError(
            f"conf has {conf.shape[-1]} answers but correct has {correct.shape[-1]}; give one correctness value "
            "per confidence (lengths must match)"
        )
    if conf.shape[-1] == 0:
        raise InputError("conf and correct are empty; give at least one answer")
    try:
        shape = torch.broadcast_shapes(conf.shape, correct.shape)
    except RuntimeError as exc:
        raise InputError(
            f"conf {tuple(conf.shape)} and correct {tuple(correct.shape)} have batch dimensions that do not "
            "broadcast; give both the same shape [..., N]"
        ) from exc
    _check_unit_interval(conf, "conf", "a confidence is a probability")
    if binary:
        _check_binary(correct, "correct")
    else:
        _check_unit_interval(correct, "correct", "1 = right, 0 = wrong")
    return conf.expand(shape).contiguous(), correct.expand(shape).contiguous()


def _check_bins(n_bins: int, binning: str) -> None:
    if not is_integer(n_bins) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, not {n_bins!r}")
    if binning not in BINNINGS:
        raise InputError(f"binning must be one of {BINNINGS}, not {binning!r}")


def _warn_undefined(undefined: torch.Tensor, what: str) -> None:
    if bool(undefined.any()):
        n, total = int(undefined.sum()), undefined.numel()
        where = "" if total == 1 else f" in {n} of {total} batch entries"
        warnings.warn(f"{what}{where}; returning NaN there", UndefinedMetricWarning, stacklevel=3)


# --- binning ------------------------------------------------------------------------------------------------
def bin_indices(conf: torch.Tensor, n_bins: int = 10, binning: str = "uniform") -> torch.Tensor:
    """The bin of every confidence, shape of ``conf`` (long).

    ``"uniform"``: bin i is [i/M, (i+1)/M), with a confidence of exactly 1 in the last bin. Edges are
    computed as i/M in the confidences' dtype, so a confidence equal to an edge goes to the bin it opens.
    ``"quantile"``: the confidence-sorted answers (stable sort, so ties keep their input order) are split
    into M consecutive parts as equal as possible, the first N mod M parts one answer larger.
    """
    _check_bins(n_bins, binning)
    conf = conf.contiguous()
    if binning == "uniform":
        # floor(conf·M) is many times faster than bucketize but can miss an edge by a rounding error;
        # one comparison against the exact edges i/M on each side puts such a value back.
        edges = torch.arange(n_bins + 1, dtype=conf.dtype, device=conf.device) / n_bins
        idx = (conf * n_bins).long().clamp_(0, n_bins - 1)
        idx -= (conf < edges[idx]).long()
        idx += ((conf >= edges[idx + 1]) & (idx < n_bins - 1)).long()
        return idx
    n = conf.shape[-1]
    q, r = divmod(n, n_bins)
    pos = torch.arange(n, device=conf.device)
    big = r * (q + 1)  # the first r parts hold q + 1 answers, the rest q
    part = torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    order = torch.argsort(conf, dim=-1, stable=True)
    return torch.empty_like(order).scatter_(-1, order, part.expand_as(order))


def _bin_sums(conf, correct, n_bins, binning):
    idx = bin_indices(conf, n_bins, binning)
    zeros = conf.new_zeros(conf.shape[:-1] + (n_bins,))
    count = zeros.scatter_add(-1, idx, torch.ones_like(conf))
    sum_conf = zeros.scatter_add(-1, idx, conf)
    sum_correct = zeros.scatter_add(-1, idx, correct)
    return idx, count, sum_conf, sum_correct


# --- calibration --------------------------------------------------------------------------------------------
def ece(conf, correct, n_bins: int = 10, binning: str = "uniform") -> torch.Tensor:
    """Expected calibration error: Σ_m |B_m|/N · |acc(B_m) − conf(B_m)| over non-empty bins.

    ``correct`` may be fractional (e.g. token accuracy); ``binning`` is ``"uniform"`` (the default) or
    ``"quantile"`` (equal mass). See :func:`bin_indices` for the bin edges.
    """
    conf, correct = _inputs(conf, correct)
    _, _, sum_conf, sum_correct = _bin_sums(conf, correct, n_bins, binning)
    # |B|/N · |acc − conf| = |Σ correct − Σ conf| / N
    return (sum_correct - sum_conf).abs().sum(-1) / conf.shape[-1]


def mce(conf, correct, n_bins: int = 10, binning: str = "uniform") -> torch.Tensor:
    """Maximum calibration error: the largest |acc(B_m) − conf(B_m)| over non-empty bins."""
    conf, correct = _inputs(conf, correct)
    _, count, sum_conf, sum_correct = _bin_sums(conf, correct, n_bins, binning)
    gap = (sum_correct - sum_conf).abs() / count.clamp(min=1)
    return torch.where(count > 0, gap, torch.zeros_like(gap)).amax(-1)


def brier(conf, correct) -> torch.Tensor:
    """Brier score: mean squared difference between confidence and correctness."""
    conf, correct = _inputs(conf, correct)
    return (conf - correct).square().mean(-1)


def nll(conf, correct, eps: float = 1e-12) -> torch.Tensor:
    """Negative log-likelihood of the correctness bits under the confidences (binary cross-entropy, nats),
    with confidences clipped to [eps, 1 − eps] so that a confident mistake costs much but stays finite."""
    conf, correct = _inputs(conf, correct)
    p = conf.clamp(eps, 1 - eps)
    return -(correct * torch.log(p) + (1 - correct) * torch.log1p(-p)).mean(-1)


def reliability(conf, correct, n_bins: int = 10, binning: str = "uniform") -> pl.DataFrame:
    """Reliability-diagram data of 1-D input: one row per bin with ``bin``, ``lower``, ``upper`` (the bin's
    edges; for quantile bins the smallest and largest confidence in it), ``count``, ``confidence`` (mean),
    ``accuracy`` (mean correctness) and ``gap`` (accuracy − confidence; negative = over-confident).
    Empty bins have null means."""
    conf, correct = _inputs(conf, correct)
    if conf.ndim != 1:
        raise InputError(f"reliability takes one set of answers (1-D); got shape {tuple(conf.shape)}")
    idx, count, sum_conf, sum_correct = _bin_sums(conf, correct, n_bins, binning)
    if binning == "uniform":
        lower = torch.arange(n_bins, dtype=conf.dtype) / n_bins
        upper = torch.arange(1, n_bins + 1, dtype=conf.dtype) / n_bins
    else:
        lower = conf.new_full((n_bins,), float("inf")).scatter_reduce(0, idx, conf, "amin").cpu()
        upper = conf.new_full((n_bins,), float("-inf")).scatter_reduce(0, idx, conf, "amax").cpu()
    count, sum_conf, sum_correct = count.cpu(), sum_conf.cpu(), sum_correct.cpu()
    empty = count == 0
    mean_conf = (sum_conf / count.clamp(min=1)).tolist()
    acc = (sum_correct / count.clamp(min=1)).tolist()

    def masked(values):
        return [None if e else v for v, e in zip(values, empty.tolist())]

    return pl.DataFrame(
        {
            "bin": list(range(n_bins)),
            "lower": masked(lower.tolist()) if binning == "quantile" else lower.tolist(),
            "upper": masked(upper.tolist()) if binning == "quantile" else upper.tolist(),
            "count": count.long().tolist(),
            "confidence": masked(mean_conf),
            "accuracy": masked(acc),
            "gap": masked([a - c for a, c in zip(acc, mean_conf)]),
        },
        schema={"bin": pl.Int32, "lower": pl.Float64, "upper": pl.Float64, "count": pl.Int64,
                "confidence": pl.Float64, "accuracy": pl.Float64, "gap": pl.Float64},
    )


# --- discrimination -----------------------------------------------------------------------------------------
def _sort(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending sort along the last axis: (values, order). On the CPU numpy's argsort (SIMD sorting
    networks) is several times faster than torch.sort; elsewhere torch sorts on the device."""
    if t.device.type == "cpu":
        order = torch.from_numpy(np.argsort(t.numpy(), axis=-1))
        return t.gather(-1, order), order
    return t.sort(-1)


def _tie_blocks(sorted_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of an ascending-sorted [..., N] tensor, the first and last position of its block
    of equal values, by running maxima/minima (linear after the sort; searchsorted is much slower)."""
    n = sorted_values.shape[-1]
    pos = torch.arange(n, device=sorted_values.device).expand_as(sorted_values)
    step = sorted_values[..., 1:] != sorted_values[..., :-1]
    edge = torch.ones_like(sorted_values[..., :1], dtype=torch.bool)
    opens = torch.cat([edge, step], -1)
    closes = torch.cat([step, edge], -1)
    first = torch.where(opens, pos, 0).cummax(-1).values
    last = torch.where(closes, pos, n).flip(-1).cummin(-1).values.flip(-1)
    return first, last


def auroc(conf, correct) -> torch.Tensor:
    """Area under the ROC curve of confidence separating right (1) from wrong (0) answers: the
    Mann-Whitney probability that a random right answer has higher confidence than a random wrong one,
    ties counting one half. NaN with an :class:`UndefinedMetricWarning` when all answers are right or all
    wrong."""
    conf, correct = _inputs(conf, correct, binary=True)
    n = conf.shape[-1]
    n_pos = correct.sum(-1)
    n_neg = n - n_pos
    srt, order = _sort(conf)
    first, last = _tie_blocks(srt)
    rank = (first + last + 2).to(conf.dtype) / 2  # 1-based rank, averaged over the tie block
    u = (rank * correct.gather(-1, order)).sum(-1) - n_pos * (n_pos + 1) / 2
    undefined = (n_pos == 0) | (n_neg == 0)
    _warn_undefined(undefined, "AUROC is undefined when every answer is right or every answer is wrong")
    return torch.where(undefined, torch.full_like(u, float("nan")), u / (n_pos * n_neg).clamp(min=1))


def auprc(conf, correct) -> torch.Tensor:
    """Area under the precision-recall curve of right answers ranked by confidence, as average precision
    (Σ over distinct thresholds of Δrecall · precision; tied confidences form one threshold, as in
    scikit-learn). 1 when every answer is right; NaN with a warning when none is."""
    conf, correct = _inputs(conf, correct, binary=True)
    n = conf.shape[-1]
    n_pos = correct.sum(-1)
    a, order = _sort(conf)
    y = correct.gather(-1, order)
    # Each right answer adds 1/P times the precision at its own threshold, i.e. over all answers with
    # confidence >= its confidence: those from the start of its tie block to the end (ascending order).
    start, _ = _tie_blocks(a)
    right_above = y.flip(-1).cumsum(-1).flip(-1)
    precision = right_above.gather(-1, start) / (n - start).to(conf.dtype)
    undefined = n_pos == 0
    _warn_undefined(undefined, "AUPRC is undefined when no answer is right")
    return torch.where(undefined, torch.full_like(n_pos, float("nan")), (y * precision).sum(-1) / n_pos.clamp(min=1))


def pairwise_choice(conf_a, conf_b) -> torch.Tensor:
    """The choice a confidence implies in the pairwise task: 0 (a) where a is more confident, 1 (b) where
    b is, 0.5 on ties."""
    a = _as_float(conf_a, "conf_a")
    b = _as_float(conf_b, "conf_b", a.device)
    if a.shape != b.shape:
        raise InputError(f"conf_a {tuple(a.shape)} and conf_b {tuple(b.shape)} must have the same shape (one per pair)")
    return torch.where(a > b, 0.0, torch.where(b > a, 1.0, 0.5)).to(a.dtype)


def pairwise_accuracy(choice, correct_a, correct_b) -> torch.Tensor:
    """Pairwise task (Steyvers et al.): the model chose, for each pair of questions, the one it is more
    likely to answer right (``choice`` 0 = a, 1 = b, 0.5 = no preference; values between count as that
    share of b). Over the pairs in which exactly one of the two was answered right, the share of credit
    given to the right one (ties one half). NaN with a warning when no pair has exactly one right answer.
    Shapes ``[..., P]`` → ``[...]``.
    """
    choice = _as_float(choice, "choice")
    a = _as_float(correct_a, "correct_a", choice.device)
    b = _as_float(correct_b, "correct_b", choice.device)
    if choice.ndim == 0 or not (choice.shape == a.shape == b.shape):
        raise InputError(
            f"choice {tuple(choice.shape)}, correct_a {tuple(a.shape)} and correct_b {tuple(b.shape)} must have "
            "the same shape, one entry per pair"
        )
    if choice.shape[-1] == 0:
        raise InputError("no pairs given; give at least one pair")
    _check_unit_interval(choice, "choice", "0 = a, 1 = b, 0.5 = no preference")
    for t, name in ((a, "correct_a"), (b, "correct_b")):
        _check_unit_interval(t, name, "1 = right, 0 = wrong")
        _check_binary(t, name)
    one_right = a != b
    credit = torch.where(a == 1, 1 - choice, choice)
    n = one_right.sum(-1)
    undefined = n == 0
    _warn_undefined(undefined, "pairwise accuracy is undefined: no pair has exactly one right answer")
    score = (credit * one_right).sum(-1) / n.clamp(min=1)
    return torch.where(undefined, torch.full_like(score, float("nan")), score)


# --- uncertainty of a metric ---------------------------------------------------------------------------------
class CI(NamedTuple):
    estimate: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


METRICS: dict[str, Callable] = {"ece": ece, "mce": mce, "brier": brier, "nll": nll, "auroc": auroc, "auprc": auprc}


def bootstrap_ci(metric: Callable | str, conf, correct, n: int = 1000, level: float = 0.95, seed: int = 0,
                 **kwargs) -> CI:
    """Percentile bootstrap interval of ``metric(conf, correct, **kwargs)``: the metric on ``n`` resamples
    of the answers (with replacement), batched. Resamples where the metric is undefined (a resample with
    only right answers for AUROC) are left out of the quantiles. Indices come from a CPU generator seeded
    with ``seed``, so the interval is the same on every device."""
    if isinstance(metric, str):
        if metric not in METRICS:
            raise InputError(f"unknown metric {metric!r}; give a function or one of {sorted(METRICS)}")
        metric = METRICS[metric]
    if not is_integer(n) or n < 1:
        raise InputError(f"n (the number of resamples) must be a positive integer, not {n!r}")
    if not 0 < level < 1:
        raise InputError(f"level must lie strictly between 0 and 1 (e.g. 0.95), not {level!r}")
    estimate = metric(conf, correct, **kwargs)  # validates the input once
    conf, correct = _inputs(conf, correct)
    size = conf.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    chunk = max(1, (1 << 22) // (size * max(1, conf[..., 0].numel())))  # keep a chunk near 4M values
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for start in range(0, n, chunk):
            idx = torch.randint(size, (min(chunk, n - start), size), generator=gen).to(conf.device)
            values.append(metric(conf[..., idx], correct[..., idx], **kwargs))
    values = torch.cat(values, -1)
    alpha = (1 - level) / 2
    q = torch.nanquantile(values, torch.tensor([alpha, 1 - alpha], dtype=values.dtype, device=values.device), dim=-1)
    return CI(estimate, q[0], q[1])


# --- recalibration -------------------------------------------------------------------------------------------
def _logits_labels(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    z = _as_float(logits, "logits")
    if z.ndim < 2 or z.shape[-1] < 2 or z.shape[-2] == 0:
        raise InputError(
            f"logits must have shape [..., N, K] with N >= 1 answers and K >= 2 classes; got {tuple(z.shape)}"
        )
    if not bool(torch.isfinite(z).all()):
        raise InputError("logits hold NaN or infinite values; fix the model's outputs (or drop those rows) first")
    y = torch.as_tensor(labels, device=z.device)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, not {y.dtype}")
    if tuple(y.shape) != tuple(z.shape[:-1]):
        raise InputError(
            f"labels {tuple(y.shape)} must have the shape of logits without the class axis, {tuple(z.shape[:-1])}"
        )
    if bool(((y < 0) | (y >= z.shape[-1])).any()):
        raise InputError(f"labels must lie in 0 .. {z.shape[-1] - 1} (the class axis of logits)")
    return z, y.long()


def fit_temperature(logits, labels, *, t_min: float = 1e-2, t_max: float = 1e2, tol: float = 1e-10,
                    max_iter: int = 100) -> torch.Tensor:
    """The temperature t in [t_min, t_max] that minimizes the NLL of ``softmax(logits / t)`` on labelled data.

    ``logits`` [..., N, K] and ``labels`` [..., N] → t of shape [...] (batched over e.g. checkpoints).
    The NLL is convex in β = 1/t (its second derivative is the variance of the logits under the softmax),
    so a bracketed Newton iteration on β finds the optimum without a learning rate or a tuned optimizer.
    """
    z, y = _logits_labels(logits, labels)
    if not 0 < t_min < t_max < float("inf"):
        raise InputError(f"need 0 < t_min < t_max < inf, got t_min={t_min}, t_max={t_max}")
    z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def slope_and_curvature(beta):
        p = torch.softmax(beta[..., None, None] * z, dim=-1)
        mean_z = (p * z).sum(-1)
        var_z = (p * (z - mean_z.unsqueeze(-1)).square()).sum(-1)
        return (mean_z - z_y).mean(-1), var_z.mean(-1)

    batch = z.shape[:-2]
    lo = torch.full(batch, 1 / t_max, dtype=z.dtype, device=z.device)
    hi = torch.full(batch, 1 / t_min, dtype=z.dtype, device=z.device)
    at_lo = slope_and_curvature(lo)[0] >= 0  # NLL rising from the smallest β: the optimum is t_max
    at_hi = slope_and_curvature(hi)[0] <= 0  # still falling at the largest β: the optimum is t_min
    beta = torch.ones(batch, dtype=z.dtype, device=z.device).clamp(lo, hi)
    for _ in range(max_iter):
        g, h = slope_and_curvature(beta)
        lo = torch.where(g < 0, beta, lo)
        hi = torch.where(g > 0, beta, hi)
        newton = beta - g / h.clamp(min=torch.finfo(z.dtype).tiny)
        inside = (newton > lo) & (newton < hi) & (h > 0)
        new = torch.where(inside, newton, (lo * hi).sqrt())  # bisect geometrically: β spans decades
        done = bool(((new - beta).abs() <= tol * beta).all())
        beta = new
        if done:
            break
    beta = torch.where(at_hi, torch.full_like(beta, 1 / t_min), beta)
    beta = torch.where(at_lo, torch.full_like(beta, 1 / t_max), beta)
    return 1 / beta


def apply_temperature(logits, t) -> torch.Tensor:
    """``logits / t`` as a new tensor (never the input itself), t of shape [] or the batch shape [...] of
    logits [..., N, K]. Softmax of the result gives the recalibrated probabilities."""
    z = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(logits, dtype=torch.float64)
    if not z.is_floating_point() or z.ndim < 1:
        raise InputError("logits must be a floating-point tensor [..., K]")
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise InputError(f"temperature must be positive and finite, got {t.tolist()}")
    if t.ndim > 0:
        if z.ndim < t.ndim + 2 or tuple(z.shape[: t.ndim]) != tuple(t.shape):
            raise InputError(
                f"a batch of temperatures {tuple(t.shape)} needs logits [*{tuple(t.shape)}, N, K]; got {tuple(z.shape)}"
            )
        t = t.reshape(t.shape + (1,) * (z.ndim - t.ndim))
    return z / t


__all__ = [
    "BINNINGS",
    "CI",
    "METRICS",
    "UndefinedMetricWarning",
    "apply_temperature",
    "auprc",
    "auroc",
    "bin_indices",
    "bootstrap_ci",
    "brier",
    "ece",
    "fit_temperature",
    "mce",
    "nll",
    "pairwise_accuracy",
    "pairwise_choice",
    "reliability",
]
