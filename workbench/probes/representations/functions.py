"""How the representations of a set of samples are organized, and 2-D layouts of them aligned over checkpoints:
pure functions of hidden states ``x`` [N, D] and labels [N].

- :func:`neighbour_purity`: the share of each sample's k nearest neighbours (in the original space, itself
  left out) that share its label. 1 when every label forms its own tight cluster; about the label's share of
  the set when the neighbourhoods ignore the labels (:func:`purity_chance`).
- :func:`silhouette`: the silhouette of each sample, (b - a) / max(a, b), with a the mean distance to the other
  samples of its label and b the smallest mean distance to another label's samples (Rousseeuw 1987; as
  scikit-learn's ``silhouette_samples``, 0 for a label with one sample).
- :func:`fourier_spectrum`: for labels that are cyclic (the answers 0..p-1 of modular addition), the power of
  the label means' discrete Fourier transform along the labels at each frequency. The modular-addition
  solution of Nanda et al. (arXiv 2301.05217) represents the answer c by cos(2πkc/p) and sin(2πkc/p) for a
  few key frequencies k, so its label means lie on circles and their power sits at those k
  (:func:`top_share`, :func:`effective_frequencies`; :func:`shuffled_spectra` for the chance level).
- :func:`aligned_pca` and :func:`aligned_umap`: 2-D coordinates of the same samples at several checkpoints,
  placed so that a sample moves as little as the layouts allow from one checkpoint to the next.

Distances are computed in row blocks of at most ``block`` samples, so memory stays at ``block`` × N.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from workbench.errors import DependencyError, InputError

METRICS = ("euclidean", "cosine")
#: Neighbours per sample for :func:`neighbour_purity`: small against a class of the built-in task (31 samples per
#: answer with p = 31), large enough that one stray neighbour moves a sample's purity by a tenth.
DEFAULT_K = 10


def _check(x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or x.shape[0] < 2:
        raise InputError(f"states must be [samples, features] with at least 2 samples, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError("the states hold NaN or infinite values; the checkpoint may be corrupt")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != x.shape[0]):
        raise InputError(f"give one label per sample: {x.shape[0]} samples, labels of shape {tuple(labels.shape)}")


def _prepared(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, not {metric!r}")
    x = x.double()
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _distances(x: torch.Tensor, rows: slice, metric: str) -> torch.Tensor:
    """Distances of the samples ``rows`` to every sample: [rows, N] (``x`` already :func:`_prepared`)."""
    if metric == "cosine":
        return (1 - x[rows] @ x.T).clamp_min_(0)
    return torch.cdist(x[rows], x)


def _blocks(n: int, block: int):
    for lo in range(0, n, block):
        yield slice(lo, min(n, lo + block))


def nearest_neighbours(x: torch.Tensor, k: int = DEFAULT_K, metric: str = "euclidean", block: int = 2048) -> torch.Tensor:
    """The indices of each sample's ``k`` nearest other samples, nearest first: [N, k]."""
    _check(x)
    n = x.shape[0]
    if not 1 <= k < n:
        raise InputError(f"k must be between 1 and the number of other samples ({n - 1}), not {k}")
    xp = _prepared(x, metric)
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for rows in _blocks(n, block):
        d = _distances(xp, rows, metric)
        d[torch.arange(d.shape[0]), torch.arange(rows.start, rows.stop)] = math.inf  # not its own neighbour
        # topk, not a full sort of every row (ten times faster at N = 1,000): among samples at exactly equal
        # distance, which one counts as the k-th neighbour is the kernel's choice
        out[rows] = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
    return out


def neighbour_purity(x: torch.Tensor, labels: torch.Tensor, k: int = DEFAULT_K, metric: str = "euclidean",
                     block: int = 2048) -> torch.Tensor:
    """The share of each sample's ``k`` nearest neighbours (itself left out) that share its label: [N]."""
    _check(x, labels)
    labels = labels.to(x.device)
    nn_idx = nearest_neighbours(x, k, metric, block)
    return (labels[nn_idx] == labels[:, None]).double().mean(1)


def purity_chance(labels: torch.Tensor) -> torch.Tensor:
    """Each sample's purity when its neighbours are drawn at random from the others: [N]."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return (counts[inverse] - 1).double() / (labels.shape[0] - 1)


def silhouette(x: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", block: int = 2048) -> torch.Tensor:
    """The silhouette of each sample: [N], in [-1, 1] (0 for a sample alone in its label). Needs two labels."""
    _check(x, labels)
    _, inverse, counts = torch.unique(labels.to(x.device), return_inverse=True, return_counts=True)
    n_labels = counts.shape[0]
    if n_labels < 2:
        raise InputError("a silhouette needs at least two labels")
    xp = _prepared(x, metric)
    onehot = torch.nn.functional.one_hot(inverse, n_labels).double()
    a = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    b = torch.empty_like(a)
    for rows in _blocks(x.shape[0], block):
        sums = _distances(xp, rows, metric) @ onehot  # [rows, labels]: summed distance to each label's samples
        own = inverse[rows]
        own_n = counts[own].double()
        a[rows] = sums.gather(1, own[:, None]).squeeze(1) / (own_n - 1).clamp_min(1)
        means = sums / counts.double()
        means.scatter_(1, own[:, None], math.inf)
        b[rows] = means.min(1).values
    s = (b - a) / torch.maximum(a, b)
    return torch.where((counts[inverse] > 1) & (torch.maximum(a, b) > 0), s, torch.zeros_like(s))


def label_means(x: torch.Tensor, labels: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean state of each label 0..period-1 ([period, D]) and which labels have samples ([period])."""
    _check(x, labels)
    if labels.min() < 0 or labels.max() >= period:
        raise InputError(f"cyclic labels must lie in 0..{period - 1}; got {int(labels.min())}..{int(labels.max())}")
    # a one-hot product rather than index_add_, whose CPU kernel is slow for few rows on a busy machine
    onehot = torch.nn.functional.one_hot(labels, period).double()
    sums = onehot.T @ x.double()
    counts = onehot.sum(0).long()
    present = counts > 0
    return sums / counts.clamp_min(1)[:, None], present


def _spectrum_of_means(means: torch.Tensor) -> torch.Tensor:
    """Shares of the variance of label means [..., period, D] at frequencies 1..period//2: [..., period // 2]."""
    period = means.shape[-2]
    centred = means - means.mean(-2, keepdim=True)
    power = torch.fft.rfft(centred, dim=-2).abs().square().sum(-1)[..., 1:]  # frequencies 1..period//2
    if period % 2 == 0:
        power[..., -1] = power[..., -1] / 2  # the Nyquist frequency has no mirror image; the others count once here
    total = power.sum(-1, keepdim=True)
    return torch.where(total > 0, power / total.clamp_min(1e-300), torch.full_like(power, math.nan))


def _all_label_means(x: torch.Tensor, labels: torch.Tensor, period: int) -> torch.Tensor:
    means, present = label_means(x, labels, period)
    if not bool(present.all()):
        raise InputError(f"labels {(~present).nonzero().flatten().tolist()} have no sample; the spectrum along "
                         f"cyclic labels needs every label 0..{period - 1}")
    return means


def fourier_spectrum(x: torch.Tensor, labels: torch.Tensor, period: int) -> torch.Tensor:
    """The share of the label means' variance at each frequency 1..period//2 along the cyclic labels:
    [period // 2], summing to 1 (NaN when the means do not vary).

    Every label 0..period-1 must have a sample; the means are centred first (frequency 0 is their mean)."""
    return _spectrum_of_means(_all_label_means(x, labels, period))


def top_share(spectrum: torch.Tensor, top: int = 1) -> float:
    """The share of the ``top`` strongest frequencies."""
    return float(torch.sort(spectrum, descending=True).values[:top].sum())


def effective_frequencies(spectrum: torch.Tensor) -> float:
    """How many frequencies the spectrum's variance is spread over: 1 / Σ share² (the inverse participation
    ratio). 1 when one frequency holds it all, period // 2 when it is spread evenly."""
    return float(1 / spectrum.square().sum(-1))


def shuffled_spectra(x: torch.Tensor, labels: torch.Tensor, period: int, draws: int = 20, seed: int = 0) -> torch.Tensor:
    """Spectra of the same label means after ``draws`` seeded shuffles of the labels' order: [draws, period // 2].
    What the spectrum looks like when the means are arranged in no cyclic order (their chance level)."""
    means = _all_label_means(x, labels, period)
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(period, generator=gen) for _ in range(draws)]).to(x.device)
    return _spectrum_of_means(means[perms])


def angle_agreement(xy: torch.Tensor, labels: torch.Tensor, period: int) -> tuple[float, int]:
    """How well a 2-D layout places the label centroids around its centre in the order of the cyclic labels:
    max over frequencies k and both directions of |mean_c exp(i(θ_c ∓ 2πkc/p))|, with θ_c the angle of label
    c's centroid. 1 when the centroids go round in the order of a frequency-k walk; returns it with that k."""
    means, present = label_means(xy, labels, period)
    if xy.shape[1] != 2:
        raise InputError(f"a layout must be [samples, 2], got {tuple(xy.shape)}")
    c = torch.arange(period, device=xy.device)[present].double()
    centred = means[present] - means[present].mean(0)
    theta = torch.atan2(centred[:, 1], centred[:, 0])
    best, best_k = 0.0, 0
    for k in range(1, period // 2 + 1):
        for sign in (1, -1):
            r = float(torch.polar(torch.ones_like(theta), theta - sign * 2 * math.pi * k * c / period).mean().abs())
            if r > best:
                best, best_k = r, k
    return best, best_k


# --- 2-D layouts aligned over checkpoints -------------------------------------------------------------------
def _check_series(xs: Sequence[torch.Tensor]) -> None:
    if not xs:
        raise InputError("give the states of at least one checkpoint")
    n = {x.shape[0] for x in xs}
    if len(n) != 1:
        raise InputError(f"every checkpoint must hold the same samples in the same order; got {sorted(n)} samples")
    for x in xs:
        _check(x)


def procrustes_rotation(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix R (a rotation or a reflection) that brings ``source`` [N, d] closest to ``target``:
    argmin ‖source R - target‖ (Schönemann 1966; scipy's ``orthogonal_procrustes``)."""
    u, _, vh = torch.linalg.svd(source.double().T @ target.double())
    return u @ vh


def pca_coordinates(x: torch.Tensor, n_components: int = 2) -> torch.Tensor:
    """The first ``n_components`` principal coordinates of ``x`` [N, D], scaled to a unit root-mean-square radius:
    [N, n_components] (zero-padded when ``x`` has fewer features)."""
    _check(x)
    c = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(c, full_matrices=False)
    y = c @ vh[:n_components].T
    if y.shape[1] < n_components:
        y = torch.cat([y, y.new_zeros(y.shape[0], n_components - y.shape[1])], 1)
    rms = y.square().sum(1).mean().sqrt()
    return y / rms if rms > 0 else y


def align_chain(layouts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layout turned (an orthogonal Procrustes fit, no scaling) onto the previous one as already turned:
    the arbitrary rotation and reflection of every layout removed, the samples' positions otherwise kept."""
    if not layouts:
        raise InputError("give at least one layout")
    out = [layouts[0].double()]
    for y in layouts[1:]:
        if y.shape != out[-1].shape:
            raise InputError(f"every layout must hold the same samples in the same order; got {tuple(y.shape)} after "
                             f"{tuple(out[-1].shape)}")
        y = y.double()
        out.append(y @ procrustes_rotation(y, out[-1]))
    return out


def aligned_pca(xs: Sequence[torch.Tensor], n_components: int = 2) -> list[torch.Tensor]:
    """Each checkpoint's :func:`pca_coordinates`, turned to best match the previous checkpoint's layout
    (:func:`align_chain`): [N, 2] each.

    Each checkpoint keeps its own principal plane (what varies most at that checkpoint); the alignment only
    removes the arbitrary sign and rotation of the principal axes, so a sample's path across checkpoints shows
    how the representation moves, not how the axes flip."""
    _check_series(xs)
    return align_chain([pca_coordinates(x, n_components) for x in xs])


def aligned_umap(xs: Sequence[torch.Tensor], n_neighbors: int = 15, min_dist: float = 0.1,
                 alignment_regularisation: float = 1e-2, alignment_window_size: int = 3, metric: str = "euclidean",
                 seed: int = 0, n_epochs: int | None = None) -> list[torch.Tensor]:
    """umap-learn's ``AlignedUMAP`` of the checkpoints' states, each sample linked to itself at the next
    checkpoint, so its position changes only as much as its neighbourhood does: [N, 2] each, each scaled to a
    unit root-mean-square radius about its centre. ``n_epochs``: umap-learn's default (by the sample count)
    when None; fewer for a quick look. Needs the ``umap`` extra."""
    _check_series(xs)
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, not {metric!r}")
    try:  # umap-learn imports numba and compiles on first use (seconds): only here, never at import time
        from umap import AlignedUMAP
    except ImportError as exc:
        raise DependencyError("aligned UMAP layouts need umap-learn: pip install 'generalization-workbench[umap]' "
                              "(or use the PCA layout, method='pca')") from exc
    n = xs[0].shape[0]
    single = len(xs) == 1
    if single:  # AlignedUMAP needs at least two slices; one checkpoint has nothing to align with
        xs = [xs[0], xs[0]]
    identity = {i: i for i in range(n)}
    reducer = AlignedUMAP(n_neighbors=min(n_neighbors, n - 1), min_dist=min_dist, metric=metric,
                          alignment_regularisation=alignment_regularisation,
                          alignment_window_size=alignment_window_size, random_state=seed,
                          **({} if n_epochs is None else {"n_epochs": n_epochs}))
    with warnings.catch_warnings():
        # A seeded fit runs on one thread, and umap-learn says so once per checkpoint: the seed is what we want.
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden", category=UserWarning)
        reducer.fit([x.detach().double().cpu().numpy() for x in xs], relations=[identity] * (len(xs) - 1))
    layouts = reducer.embeddings_
    if len(layouts) != len(xs) or any(np.asarray(e).shape != (n, 2) for e in layouts):
        raise InputError(f"AlignedUMAP returned layouts of shapes {[np.asarray(e).shape for e in layouts]}; "
                         f"expected {len(xs)} of {(n, 2)}")
    out = []
    for e in layouts:
        y = torch.as_tensor(np.asarray(e), dtype=torch.float64)
        y = y - y.mean(0)
        out.append(y / y.square().sum(1).mean().sqrt().clamp_min(1e-12))
    return out[:1] if single else out


__all__ = ["DEFAULT_K", "METRICS", "align_chain", "aligned_pca", "aligned_umap", "angle_agreement",
           "effective_frequencies", "fourier_spectrum", "label_means", "nearest_neighbours", "neighbour_purity",
           "pca_coordinates", "procrustes_rotation", "purity_chance", "shuffled_spectra", "silhouette", "top_share"]
