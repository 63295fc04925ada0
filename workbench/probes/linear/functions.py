"""Linear probes at every layer at once (docs/probes.md, "Linear probes"; Zhang, Choshen & Andreas,
arXiv 2409.02228).

:func:`fit_probes` trains one L2-regularized logistic regression per layer on features ``[layers, samples,
dim]`` and labels ``[samples]``, with early stopping on a held-out part of the training data. The layers
are batched problems: each step is one batched matrix product over the layers of a group (on a GPU every
layer; on a CPU cache-sized groups, spread over the threads), and each layer keeps its own L-BFGS curvature
history, step length and stopping point, so a layer that converges or stops early does not change the
others' result. An iteration reads the features twice (the logits of the search direction, then the
gradient); the standardization is folded into the parameters, so the features are never copied; without
early stopping a low-rank preconditioner cuts the iterations a few times over. The objective of one layer
is, on standardized features,

    mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||²        (the bias is not penalized)

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n_fit))`` (two classes: one weight vector and the
sigmoid; more: the multinomial softmax with a weight vector per class, as scikit-learn does).

Control tasks (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks"): give each
sample a *type* (the input token the probe could memorize, e.g. the word at the probed position); the
control task gives every type a random label drawn from the task's label distribution. A probe is
*selective* when its accuracy on the task is well above its accuracy on the control task: it reads what
the representation encodes rather than memorizing types. ``fit_probes(..., types=...)`` fits the control
probes in the same batched problem and ``probes.selectivity(...)`` reports the difference per layer.

Why written here rather than taken from a library: scikit-learn fits one layer at a time on the CPU, and
``torch.optim.LBFGS`` treats every parameter as one problem (a shared line search and shared curvature
pairs would couple the layers); no library runs many independent L-BFGS problems as one batched problem.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import InputError, NumericalError

# --- input checks (at the boundary only) ----------------------------------------------------------------


def _as_features(features, name: str = "features", device=None, check_finite: bool = True) -> torch.Tensor:
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    x = x.detach()
    if device is not None:
        x = x.to(device)
    if x.dim() == 2:  # one layer
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise InputError(f"{name} must have shape [layers, samples, dim] (or [samples, dim]); got {tuple(x.shape)}")
    if x.is_complex():
        raise InputError(f"{name} must hold real numbers, not complex ones")
    x = x.float()
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise InputError(f"{name} is empty (shape {tuple(x.shape)}); give at least one sample and one dimension")
    # A sum is finite exactly when every value is (bar overflow) and costs no mask the size of the features.
    if check_finite and not bool(torch.isfinite(x.sum())):
        _raise_if_not_finite(x, name)
    return x


def _raise_if_not_finite(x: torch.Tensor, name: str = "features", first_layer: int = 0) -> None:
    """The error for NaN or infinite values in ``x`` (layers numbered from ``first_layer``); nothing when every
    value is finite (a sum that overflowed)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        layer, sample, dim = (int(v) for v in bad.nonzero()[0])
        raise InputError(
            f"{name} hold NaN or infinite values ({int(bad.sum())} of them, the first at layer {first_layer + layer}, "
            f"sample {sample}, dim {dim}); capture the hidden states again in float32, or drop those samples"
        )


def _as_labels(labels, n: int, n_classes: int | None, name: str = "labels", device=None) -> tuple[torch.Tensor, int]:
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.detach()
    if device is not None:
        y = y.to(device)
    if y.dim() != 1:
        raise InputError(f"{name} must be one class index per sample, shape [samples]; got {tuple(y.shape)}")
    if y.is_floating_point():
        if bool((y != y.round()).any()) or not bool(torch.isfinite(y).all()):
            raise InputError(f"{name} must be integer class indices 0..C-1, not fractional or NaN values")
    elif y.dtype == torch.bool:
        y = y.long()
    y = y.long()
    if y.shape[0] != n:
        raise InputError(f"{n} samples of features but {y.shape[0]} {name}; give one label per sample")
    if n_classes is None:
        n_classes = int(y.max()) + 1 if y.numel() else 0
    lo, hi = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
    if lo < 0 or hi >= n_classes:
        raise InputError(
            f"{name} must lie in 0..{n_classes - 1} (n_classes={n_classes}); found values from {lo} to {hi}. "
            "Map the labels to class indices first (e.g. torch.unique(labels, return_inverse=True)[1])"
        )
    return y, n_classes


# --- control tasks -------------------------------------------------------------------------------------------


def _type_keys(types) -> list[str]:
    if isinstance(types, torch.Tensor):
        types = types.detach().cpu()
        return [str(v) for v in (types.tolist() if types.dim() == 1 else [tuple(r) for r in types.tolist()])]
    return [str(t) for t in types]


@dataclass(frozen=True)
class ControlTask:
    """A control task (Hewitt & Liang 2019): each input type gets one random label.

    The label of a type depends only on the type, ``seed`` and ``class_probs``, so the same type gets the same
    label in the training and the test split (a probe could memorize it), and a type never seen in training
    still gets its label.
    """

    class_probs: tuple[float, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        p = np.asarray(self.class_probs, dtype=float)
        if p.ndim != 1 or len(p) < 2 or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise InputError(f"class_probs must be a distribution over at least two classes; got {self.class_probs}")

    @classmethod
    def like(cls, labels, n_classes: int | None = None, seed: int = 0) -> "ControlTask":
        """Labels drawn from the empirical label distribution of ``labels`` (as Hewitt & Liang do)."""
        y = torch.as_tensor(labels).long().cpu()
        n_classes = n_classes or int(y.max()) + 1
        counts = torch.bincount(y, minlength=n_classes).double()
        return cls(tuple((counts / counts.sum()).tolist()), seed)

    @property
    def n_classes(self) -> int:
        return len(self.class_probs)

    def labels(self, types) -> torch.Tensor:
        """The control label of each sample, from its type (any values; compared by ``str``)."""
        keys = _type_keys(types)
        cum = np.cumsum(self.class_probs)
        cum[-1] = 1.0
        memo: dict[str, int] = {}
        out = np.empty(len(keys), dtype=np.int64)
        for i, k in enumerate(keys):
            if k not in memo:
                # A hash rather than a random generator: the label of a type must not depend on which other
                # types were seen before it, or on the split.
                h = hashlib.blake2b(f"{self.seed}\x00{k}".encode(), digest_size=8).digest()
                u = int.from_bytes(h, "little") / 2.0**64
                memo[k] = int(np.searchsorted(cum, u, side="right"))
            out[i] = memo[k]
        return torch.from_numpy(out)


# --- batched L-BFGS over independent problems ------------------------------------------------------------


def _pdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product of parameters shaped [L, T, K, D+1] → [L, T]."""
    return (a * b).sum(dim=(2, 3))


def _bc(v: torch.Tensor) -> torch.Tensor:
    """A per-problem scalar [L, T] broadcast against parameters [L, T, K, D+1] or logits [L, T, K, N]."""
    return v[:, :, None, None]


class _Problem:
    """Mean cross-entropy + l2/2 ||W||² of every (layer, label row) problem at once, read from the raw features.

    ``theta`` is [L, T, K, D+1] (column D is the bias) and acts on standardized features, but those are never
    materialized: the mean and scale fold into each product, ``X (w/s) + (b - mean·w/s)`` forward and
    ``(Xᵀr - mean·Σr) / s`` backward, so a pass reads the caller's tensor in place, once.
    One pass gives the logits of every sample; ``fit_w`` and ``val_w`` (1/n on their part, 0 elsewhere) weigh
    them, so the held-out loss costs no pass of its own. K = 1 for two classes (a logit and the sigmoid, as
    scikit-learn's binary model), else K = C (the softmax).
    """

    def __init__(self, x, mean, scale, ys, fit_w, val_w, n_classes: int, l2: float, threads: int = 1):
        self.x = x  # [L, N, D], the caller's tensor
        self.threads = threads  # for the passes over x; the rest runs on one thread (see _pass_threads)
        self.live = None  # layers still being fitted (None: all); see keep()
        self.mean, self.inv = mean, 1.0 / scale  # [L, D]
        self.binary = n_classes == 2
        self.l2 = l2
        self.fit_w, self.val_w = fit_w, val_w  # [N]
        if self.binary:
            self.yf = ys.float()[None, :, None, :]  # [1, T, 1, N]
        else:
            self.onehot = F.one_hot(ys, n_classes).transpose(1, 2).float()[None]  # [1, T, C, N]

    def _layers(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.live is None else t.index_select(0, self.live)

    def _scatter(self, part: torch.Tensor, like_shape) -> torch.Tensor:
        if self.live is None:
            return part
        out = part.new_zeros(like_shape)
        out[self.live] = part
        return out

    def keep(self, layers: torch.Tensor) -> None:
        """Compute only ``layers`` (a bool mask [L]) from now on. Copying their features costs a few passes (most
        of it fresh memory), so it is done only once the finished layers are at least half of those still in
        the products."""
        idx = layers.nonzero()[:, 0]
        now = self.x.shape[0] if self.live is None else self.live.numel()
        if 0 < idx.numel() <= now // 2:
            pos = idx if self.live is None else torch.searchsorted(self.live, idx)
            with _threads(self.x.device, self.threads):
                self.x = self.x.index_select(0, pos)
            self.live = idx

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """Logits [L, T, K, N] (a linear map of ``theta``; zero for layers no longer computed)."""
        L, T, K, d1 = theta.shape
        th = self._layers(theta)
        inv, mean = self._layers(self.inv), self._layers(self.mean)
        w = th[..., :-1] * inv[:, None, None]
        b = th[..., -1] - (w * mean[:, None, None]).sum(-1)
        l = th.shape[0]
        # [T·K, D] @ Xᵀ: with few outputs this orientation is several times faster than X @ W on the CPU.
        z = _bmm(w.reshape(l, T * K, d1 - 1), self.x.transpose(1, 2), self.threads) + b.reshape(l, T * K, 1)
        return self._scatter(z.view(l, T, K, -1), (L, T, K, z.shape[-1]))

    def sample_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every sample [L, T, N]."""
        if self.binary:
            zz = z[:, :, 0]
            return F.softplus(zz) - self.yf[:, :, 0] * zz
        return torch.logsumexp(z, dim=2) - (z * self.onehot).sum(2)

    def loss(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The objective [L, T] at ``theta`` with logits ``z``."""
        w = theta[..., :-1]
        return (self.sample_loss(z) * self.fit_w).sum(-1) + 0.5 * self.l2 * (w * w).sum(dim=(2, 3))

    def val_loss(self, z: torch.Tensor) -> torch.Tensor:
        return (self.sample_loss(z) * self.val_w).sum(-1)

    def grad(self, z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Gradient (like ``theta``) at ``theta`` with logits ``z``: one pass (zero for layers no longer computed)."""
        _, T, K, d1 = theta.shape
        zl = self._layers(z)
        r = (torch.sigmoid(zl) - self.yf) if self.binary else (torch.softmax(zl, dim=2) - self.onehot)
        r = r * self.fit_w  # [l, T, K, N]
        l, n = r.shape[0], r.shape[-1]
        # Rᵀ X rather than Xᵀ R: the same product, several times faster on the CPU (X is read row by row).
        xr = _bmm(r.reshape(l, T * K, n), self.x, self.threads).view(l, T, K, d1 - 1)
        rs = r.sum(-1)
        g = torch.empty(l, T, K, d1, dtype=theta.dtype, device=theta.device)
        mean, inv = self._layers(self.mean)[:, None, None], self._layers(self.inv)[:, None, None]
        g[..., :-1] = (xr - rs[..., None] * mean) * inv
        g[..., -1] = rs
        g = self._scatter(g, theta.shape)
        g[..., :-1] += self.l2 * theta[..., :-1]
        return g


_SKETCH_RANK = 48  # the preconditioner's rank: on the benchmark, 32 needs more iterations and 64 saves none


@functools.lru_cache(maxsize=4)
def _test_matrix(dim: int, k: int, seed: int) -> torch.Tensor:
    """An orthonormal random [dim, k] float64 matrix (the same for every group of layers of a fit)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, k, generator=gen, dtype=torch.float64)).Q


class _Preconditioner:
    """An approximate inverse of the objective's Hessian at zero: L-BFGS's initial matrix when fitting to the
    optimum.

    At theta = 0 the Hessian is ``c·Cov + l2·I`` on the weights and ``c`` on the centred bias: ``c`` is the
    loss's curvature at zero logits (1/4 for the sigmoid, 1/C for the softmax) and ``Cov`` the covariance of the
    features the parameters act on. Hidden states have a few strong directions over a wide bulk, which make
    plain L-BFGS crawl (on the benchmark 57 iterations against 14). Here ``Cov ≈ U Λ Uᵀ`` on the span of U, a
    randomized Nyström sketch of rank k (Tropp, Yurtsever, Udell & Cevher 2017) from a random subset of the
    fitted samples, and the diagonal it misses on the rest; each part is inverted on its own, in O(D·k) per
    use. Building it costs about ten passes; it changes the path to the optimum, not the optimum.
    """

    def __init__(self, prob: _Problem, rows: torch.Tensor, raw_mean, raw_var, c: float, l2: float, rank: int,
                 seed: int):
        x = prob.x
        if rows.numel() < x.shape[1]:
            with _threads(x.device, prob.threads):
                # Layer by layer: each layer's rows are contiguous even where the layers are not (index_select
                # on the whole would copy such a strided view first, indexing is several times slower).
                rows = rows.sort().values
                sub = x.new_empty(x.shape[0], rows.numel(), x.shape[2])
                for layer in range(x.shape[0]):
                    torch.index_select(x[layer], 0, rows, out=sub[layer])
                x = sub
        dim = x.shape[2]
        k = min(rank, dim)
        inv, mu = prob.inv.double(), raw_mean.double()
        # One test matrix for every layer, so a layer's preconditioner does not depend on the others.
        q = _test_matrix(dim, k, seed).to(x.device)
        cq = self._cov_times(x, q, mu, inv, prob.threads)
        # One power iteration: without it the wide bulk leaks into the sketch of the strong directions (on the
        # benchmark twice the L-BFGS iterations).
        q = torch.linalg.qr(cq).Q
        cq = self._cov_times(x, q, mu, inv, prob.threads)
        # Nyström: Cov ≈ F Fᵀ with F = (Cov Q)(Qᵀ Cov Q)^(-1/2), through eigendecompositions of k × k matrices
        # only, so that a rank-deficient sketch (fewer samples than k, constant features) needs no special case.
        core = q.transpose(1, 2) @ cq
        ev, vec = torch.linalg.eigh(0.5 * (core + core.transpose(1, 2)))
        keep = ev > 1e-7 * ev.amax(-1, keepdim=True).clamp_min(1e-30)
        f = cq @ (vec * torch.where(keep, ev.clamp_min(1e-300).rsqrt(), 0.0)[:, None])
        lam, vec = torch.linalg.eigh(f.transpose(1, 2) @ f)  # F = U diag(sqrt(lam)) vecᵀ
        kept = lam > 1e-7 * lam.amax(-1, keepdim=True).clamp_min(1e-300)
        lam = torch.where(kept, lam, 0.0)
        u = f @ (vec * torch.where(kept, lam.clamp_min(1e-300).rsqrt(), 0.0)[:, None])
        # The rest of Cov: the diagonal the sketch misses, spread over the directions it can still have
        # (min(D, n - 1) - k, not D: with fewer samples than dimensions the rest is not full rank).
        diag = raw_var.double() * inv * inv
        n_fit = int((prob.fit_w > 0).sum())
        room = (min(dim, n_fit - 1) - kept.sum(-1, keepdim=True)).clamp_min(1)
        r = (diag - (u * u * lam[:, None]).sum(-1)).clamp_min(1e-3 * diag.mean(-1, keepdim=True) + 1e-12) * dim / room
        self.u = u.float()
        self.lam_inv = torch.where(kept, 1.0 / (c * lam + l2), 0.0).float()
        self.r_inv = (1.0 / (c * r + l2)).float()
        self.c = c
        # The parameters' features have mean (mean - fold mean) / scale: zero when standardized.
        shift = (mu - prob.mean.double()) * inv
        self.shift = shift.float() if bool(shift.abs().amax() > 0) else None

    @staticmethod
    def _cov_times(x, q, mu, inv, threads: int) -> torch.Tensor:
        """Cov Q [L, D, k] for Q [D, k] or [L, D, k] (float64), over the samples of ``x``: two products with k
        columns, the mean and scale folded in. X Q then Xᵀ(X Q): on the CPU this orientation of the two
        products is about a third faster than Qᵀ Xᵀ then (Qᵀ Xᵀ) X."""
        qs = (q * inv[:, :, None]).float()  # Q in raw coordinates
        y = _bmm(x, qs.expand(x.shape[0], -1, -1), threads)  # [L, m, k]
        y = (y - (mu[:, :, None] * qs).sum(1)[:, None].float()) / x.shape[1]  # centred
        z = _bmm(x.transpose(1, 2), y, threads).double()  # [L, D, k]
        return (z - mu[:, :, None] * y.sum(1).double()[:, None]) * inv[:, :, None]

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        """The approximate inverse Hessian times ``q`` [L, T, K, D+1]."""
        L, T, K, d1 = q.shape
        qw, qb = q[..., :-1], q[..., -1]
        if self.shift is not None:  # to the centred bias b + mean·w
            qw = qw - self.shift[:, None, None] * qb[..., None]
        qw = qw.reshape(L, T * K, d1 - 1)
        # U diag(1/(cΛ + l2)) Uᵀ q on the sketched directions, and diag(1/(c·r + l2)) on the rest, projected so
        # that it stays there (data with fewer samples than dimensions never leaves the samples' span).
        u, ut = self.u, self.u.transpose(1, 2)
        qu = torch.bmm(qw, u)
        rest = (qw - torch.bmm(qu, ut)) * self.r_inv[:, None]
        pw = rest - torch.bmm(torch.bmm(rest, u), ut) + torch.bmm(qu * self.lam_inv[:, None], ut)
        pw = pw.view(L, T, K, d1 - 1)
        pb = qb / self.c
        if self.shift is not None:  # and back
            pb = pb - (self.shift[:, None, None] * pw).sum(-1)
        return torch.cat([pw, pb[..., None]], dim=-1)


class _Curvature:
    """The last ``history`` curvature pairs (s, y) of every problem, in the compact form of Byrd, Nocedal &
    Schnabel (1994, eq. 3.13): the inverse-Hessian approximation H (initial matrix ``gamma·P``, P the
    preconditioner) times a vector is then a few batched products whatever the history's length, where the
    two-loop recursion costs four small operations per pair (each a dispatch of its own: on a CPU, with ten
    pairs, a large share of the fit's time). A pair failing the curvature condition is stored as zeros for its problem, with a
    unit diagonal in R, and then contributes nothing. The m × m algebra runs in float64.
    """

    def __init__(self, n_problems: int, n_params: int, history: int, like: torch.Tensor):
        self.history = history
        self.s = like.new_zeros(n_problems, 0, n_params)  # steps
        self.py = like.new_zeros(n_problems, 0, n_params)  # P times the gradient changes
        self.r = torch.zeros(n_problems, 0, 0, dtype=torch.float64, device=like.device)  # triu(Sᵀ Y)
        self.ypy = torch.zeros_like(self.r)  # Yᵀ P Y
        self.gamma = torch.ones(n_problems, dtype=torch.float64, device=like.device)

    def direction(self, g: torch.Tensor, pg: torch.Tensor) -> torch.Tensor:
        """-H g for gradients g [P, n] with pg = P g."""
        gamma = self.gamma[:, None]
        if self.s.shape[1] == 0:
            return -(gamma.to(pg.dtype) * pg)
        a = torch.bmm(self.s, g[:, :, None]).double()  # Sᵀ g
        b = torch.bmm(self.py, g[:, :, None]).double()  # Yᵀ P g
        c = torch.linalg.solve_triangular(self.r, a, upper=True)
        rhs = torch.diagonal(self.r, dim1=1, dim2=2)[:, :, None] * c + gamma[:, :, None] * (self.ypy @ c - b)
        u = torch.linalg.solve_triangular(self.r.transpose(1, 2), rhs, upper=False)
        hg = (gamma * pg.double()).to(pg.dtype) + torch.bmm(u.transpose(1, 2).to(g.dtype), self.s)[:, 0] \
            - torch.bmm((gamma[:, :, None] * c).transpose(1, 2).to(g.dtype), self.py)[:, 0]
        return -hg

    def add(self, s: torch.Tensor, y: torch.Tensor, py: torch.Tensor) -> None:
        """Add the pair (s, y) [P, n] (py = P y) of every problem; a problem whose pair has too little curvature
        (sᵀy not clearly positive: the approximation would lose positive definiteness) keeps its history."""
        sy = (s * y).sum(-1).double()
        good = sy > 1e-10 * (y * y).sum(-1).double().sqrt() * (s * s).sum(-1).double().sqrt()
        keep = good[:, None].to(s.dtype)
        s, y, py = s * keep, y * keep, py * keep
        if self.s.shape[1] == self.history:
            self.s, self.py = self.s[:, 1:], self.py[:, 1:]
            self.r, self.ypy = self.r[:, 1:, 1:], self.ypy[:, 1:, 1:]
        self.s = torch.cat([self.s, s[:, None]], 1)
        self.py = torch.cat([self.py, py[:, None]], 1)
        j = self.s.shape[1]
        col = torch.bmm(self.s, y[:, :, None])[:, :, 0].double()  # s_iᵀ y: the new column of R
        col[:, -1] = torch.where(good, col[:, -1], 1.0)
        self.r = F.pad(self.r, (0, 1, 0, 1))
        self.r[:, :, j - 1] = col
        ypy = torch.bmm(self.py, y[:, :, None])[:, :, 0].double()  # (P y_i)ᵀ y = y_iᵀ P y
        self.ypy = F.pad(self.ypy, (0, 1, 0, 1))
        self.ypy[:, :, j - 1] = ypy
        self.ypy[:, j - 1, :] = ypy
        ypy_new = ypy[:, -1]
        self.gamma = torch.where(good, sy / ypy_new.clamp_min(1e-30), self.gamma)


def _lbfgs(
    prob: _Problem,
    theta: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int,
    early_stop: bool,
    patience: int,
    min_delta: float,
    ftol: float = 1e-7,
    precond: _Preconditioner | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimize every problem of ``prob`` from ``theta``; each problem has its own curvature pairs, Armijo
    backtracking step and stopping point. With ``early_stop``, each problem keeps the parameters of its lowest
    held-out loss and stops after ``patience`` iterations without an improvement of ``min_delta``.

    Each iteration reads the features twice: once for the logits of the search direction (the logits are linear
    in the parameters, so every step length of the line search is then evaluated without another pass, and the
    accepted point's logits come for free) and once for the gradient at the accepted point.

    Returns the parameters, the iteration each problem's result comes from, and whether it converged.
    """
    # From zero all logits are zero: no pass needed.
    z = prob.logits(theta) if bool(theta.any()) else theta.new_zeros(*theta.shape[:3], prob.fit_w.shape[0])
    f = prob.loss(z, theta)
    g = prob.grad(z, theta)
    pg = g if precond is None else precond(g)  # P g; P is linear, so P y = P g_new - P g_old costs nothing more
    L, T = f.shape
    shape, flat = theta.shape, (L * T, -1)
    dev = theta.device
    curvature = _Curvature(L * T, theta[0, 0].numel(), history, theta)
    active = torch.ones(L, T, dtype=torch.bool, device=dev)
    converged = torch.zeros(L, T, dtype=torch.bool, device=dev)
    best_it = torch.zeros(L, T, dtype=torch.long, device=dev)
    if early_stop:
        best = prob.val_loss(z)
        best_theta = theta.clone()
        stall = torch.zeros(L, T, dtype=torch.long, device=dev)
    for it in range(1, max_iter + 1):
        d = curvature.direction(g.reshape(flat), pg.reshape(flat)).view(shape)
        gd = _pdot(g, d)
        uphill = gd >= 0  # not a descent direction (rare, from round-off): steepest descent instead
        if bool(uphill.any()):
            d = torch.where(_bc(uphill), -g, d)
            gd = torch.where(uphill, -_pdot(g, g), gd)
        d = d * _bc(active.float())
        # The first step has no curvature to scale it but the preconditioner's; without one keep it short, as
        # torch's LBFGS does.
        if it > 1 or precond is not None:
            t = torch.ones(L, T, device=dev)
        else:
            t = 1.0 / g.abs().sum(dim=(2, 3)).clamp_min(1.0)
        u = prob.logits(d)  # the one forward pass: z(theta + t d) = z + t u
        todo = active.clone()
        new_theta, new_f, new_z = theta, f, z
        for _ in range(20):  # Armijo backtracking; candidates evaluated for every problem at once, from u
            cand = theta + _bc(t) * d
            zc = z + _bc(t) * u
            fc = prob.loss(zc, cand)
            ok = todo & (fc <= f + 1e-4 * t * gd) & torch.isfinite(fc)
            if bool(ok.any()):
                # t is no longer changed where a step was accepted, so there cand is that step: where every
                # problem still searching accepts, cand is the whole answer (the common case, one copy fewer).
                every = bool((ok | ~todo).all())
                new_theta = cand if every else torch.where(_bc(ok), cand, new_theta)
                new_z = zc if every else torch.where(_bc(ok), zc, new_z)
                new_f = torch.where(ok, fc, new_f)
                todo &= ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, t * 0.5, t)
        # A problem whose line search found no decrease is at its optimum to round-off: stop it.
        converged |= todo
        moved = active & ~todo
        active &= ~todo
        # Stop where the loss no longer falls beyond float32 round-off (scipy's L-BFGS-B 'factr' test; a
        # stricter tol cannot be met in float32), or (below) where the gradient is small.
        stalled = active & ((f - new_f) <= ftol * torch.maximum(f.abs(), new_f.abs()).clamp_min(1.0))
        if not bool(torch.isfinite(new_f).all()):
            raise NumericalError("the probe's loss became NaN or infinite; standardize the features or raise l2")
        # The held-out check needs only the logits, so it comes before the gradient: when every problem stops
        # here, the gradient pass is skipped.
        patient = active
        if early_stop:
            vl = prob.val_loss(new_z)
            better = active & (vl < best - min_delta)
            best = torch.where(better, vl, best)
            best_theta = torch.where(_bc(better), new_theta, best_theta)
            best_it = torch.where(better, it, best_it)
            stall = torch.where(better, 0, stall + active.long())
            patient = active & (stall < patience)
        else:
            best_it = torch.where(active, it, best_it)
        if not bool((patient & ~stalled).any()):
            converged |= stalled
            theta = new_theta
            break
        new_g = prob.grad(new_z, new_theta)  # the second pass
        if not bool(moved.all()):
            new_g = torch.where(_bc(moved), new_g, g)
        new_pg = new_g if precond is None else precond(new_g)
        curvature.add((new_theta - theta).reshape(flat), (new_g - g).reshape(flat), (new_pg - pg).reshape(flat))
        theta, f, g, z, pg = new_theta, new_f, new_g, new_z, new_pg
        done = (g.abs().amax(dim=(2, 3)) <= tol) | stalled
        converged |= done & active
        active = patient & ~done
        if not bool(active.any()):
            break
        # Where every remaining problem is within two iterations of running out of patience, copying their
        # layers' features would most likely cost more than the passes it saves.
        if not early_stop or int((patience - stall)[active].max()) > 2:
            prob.keep(active.any(1))
    return (best_theta if early_stop else theta), best_it, converged


@contextlib.contextmanager
def _threads(device: torch.device, n: int):
    """Run the block with ``n`` CPU threads (nothing changes on other devices)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bmm(a: torch.Tensor, b: torch.Tensor, threads: int) -> torch.Tensor:
    """``torch.bmm`` on ``threads`` CPU threads: only the products over the features get the thread pool."""
    with _threads(a.device, threads):
        return torch.bmm(a, b)


def _pass_threads(numel: int, small: int = 1 << 21) -> int:
    """Threads for a pass over features of ``numel`` values: the caller's count, or one for small problems.
    Everything else in a fit (operations on [layers, samples] logits and [layers, dim] parameters) runs on one
    thread: those take microseconds, and waking a thread pool for each costs more than that (milliseconds when
    the cores are shared with other work)."""
    return torch.get_num_threads() if numel >= small else 1


def _few_threads_if_small(device: torch.device, numel: int):
    return _threads(device, _pass_threads(numel))


def _fit_moments(x: torch.Tensor, part: torch.Tensor, threads: int):
    """Mean and population std [L, D] of features [L, N, D] over the samples where ``part`` [N] is 1 (as
    StandardScaler on that part), in one read of the features: over chunks of samples small enough to stay in
    cache, the weighted sums of the features and of their squares, both shifted by the first fitted sample (so
    a constant feature gets its exact value and zero spread, and large offsets cancel before squaring), summed
    in float64. On one thread: a thread pool woken for each chunk costs more than it saves."""
    L, n, dim = x.shape
    count = part.sum()
    shift = x[:, int(part.nonzero()[0, 0])].clone()  # [L, D]
    total = torch.zeros(L, 1, dim, dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    chunk_bytes = 1 << 20 if x.device.type == "cpu" else 1 << 28  # a GPU wants few, large launches instead
    step = max(1, chunk_bytes // (x.element_size() * L * dim))
    for i in range(0, n, step):
        centred = x[:, i:i + step] - shift[:, None]
        w = part[i:i + step].expand(L, 1, -1)
        total += torch.bmm(w, centred)
        squares += torch.bmm(w, centred.square_())
    mean_shift = (total[:, 0] / count).float()
    var = (squares[:, 0] / count - (total[:, 0] / count) ** 2).clamp_min(0)
    return shift + mean_shift, var.sqrt().float()


# --- the probes ------------------------------------------------------------------------------------------------


@dataclass
class LinearProbes:
    """One fitted logistic-regression probe per layer.

    ``weight`` is [layers, dim, K] and ``bias`` [layers, K] on standardized features (``mean``, ``scale``
    [layers, dim]); K = 1 for two classes. ``epochs`` is the L-BFGS iteration each layer's weights come
    from (the best on the validation part when early stopping). ``control`` holds the control-task probes
    when the fit was given types.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    n_classes: int
    l2: float
    epochs: torch.Tensor
    converged: torch.Tensor
    control: "LinearProbes | None" = None
    control_task: ControlTask | None = None
    options: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _check(self, features) -> torch.Tensor:
        x = _as_features(features, device=self.device)
        if x.shape[0] != self.n_layers or x.shape[2] != self.weight.shape[1]:
            raise InputError(
                f"the probes were fitted on {self.n_layers} layers of dim {self.weight.shape[1]}; got features of "
                f"shape {tuple(x.shape)}"
            )
        return x

    def decision_function(self, features) -> torch.Tensor:
        """Logits [layers, samples, K] (K = 1 for two classes: the log-odds of class 1)."""
        x = self._check(features)
        # The standardization folds into the weights and bias: no standardized copy of the features.
        w = self.weight / self.scale[:, :, None]  # [L, D, K]
        b = self.bias - (self.mean[:, :, None] * w).sum(1)  # [L, K]
        with _few_threads_if_small(x.device, x.numel()):
            # Wᵀ Xᵀ rather than X W: with few outputs, several times faster on the CPU.
            return torch.baddbmm(b[:, :, None], w.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)

    def predict_proba(self, features) -> torch.Tensor:
        """Class probabilities [layers, samples, classes]."""
        z = self.decision_function(features)
        if self.n_classes == 2:
            p1 = torch.sigmoid(z[..., 0])
            return torch.stack([1 - p1, p1], dim=-1)
        return torch.softmax(z, dim=-1)

    def predict(self, features) -> torch.Tensor:
        """Predicted class per layer and sample, [layers, samples]."""
        z = self.decision_function(features)
        return (z[..., 0] > 0).long() if self.n_classes == 2 else z.argmax(-1)

    def accuracy(self, features, labels) -> torch.Tensor:
        """Share of samples each layer's probe classifies right, [layers]."""
        pred = self.predict(features)
        y, _ = _as_labels(labels, pred.shape[1], self.n_classes, device=self.device)
        return (pred == y[None]).float().mean(1)

    def control_accuracy(self, features, types) -> torch.Tensor:
        """Accuracy [layers] of the control probes on the control labels of ``types``."""
        if self.control is None or self.control_task is None:
            raise InputError(
                "these probes were fitted without types, so they have no control task; pass types= to fit_probes"
            )
        ctrl = self.control_task.labels(types)
        n = self._check(features).shape[1]
        if ctrl.shape[0] != n:
            raise InputError(f"{ctrl.shape[0]} types for {n} samples; give one type per sample")
        return self.control.accuracy(features, ctrl)

    def selectivity(self, features, labels, types) -> torch.Tensor:
        """Task accuracy minus control-task accuracy, per layer (Hewitt & Liang 2019)."""
        return self.accuracy(features, labels) - self.control_accuracy(features, types)


#: On a CPU, layers are fitted in groups whose features fit in about this many bytes: every L-BFGS iteration
#: reads a group's features twice, faster from the cache than from main memory, while each group's iteration
#: costs a fixed number of small operations whatever its size (the fits are independent per layer, so
#: grouping changes no result).
_CPU_GROUP_BYTES = 48 << 20


def _layer_groups(x: torch.Tensor) -> list[slice]:
    """Slices of the layers of ``x`` [L, N, D] to fit together: all at once on a GPU (fewer, larger launches);
    on a CPU groups within the byte budget, as many as a multiple of the threads where the layers allow, so that
    the threads (see :func:`_map_groups`) end together."""
    L = x.shape[0]
    if x.device.type != "cpu":
        return [slice(0, L)]
    per_layer = x[0].numel() * x.element_size()
    size = max(1, min(L, _CPU_GROUP_BYTES // max(1, per_layer)))
    threads = torch.get_num_threads()
    if threads > 1 and per_layer * L > _CPU_GROUP_BYTES // 4:  # small problems: one group, one thread's work
        n_groups = min(L, -(-L // size // threads) * threads)
        size = -(-L // n_groups)
    return [slice(i, min(i + size, L)) for i in range(0, L, size)]


def _map_groups(fit, groups: list[slice], device: torch.device) -> list:
    """``fit`` over the layer groups. On a CPU with several threads and groups, the groups are spread over the
    threads (each takes the next group when it is free), every operation then on one thread: that is how
    scikit-learn's users fit layers in parallel too, and it scales where splitting each small product over
    the threads does not (each thread streams its own layer's features from its cache). torch releases the
    GIL inside its operations, so Python threads suffice. A layer's fit does not depend on the grouping."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(groups) < 2:
        return [fit(g) for g in groups]
    # Threads started after this read the count once, at their first parallel operation.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(groups))) as pool:
            return list(pool.map(fit, groups))
    finally:
        torch.set_num_threads(threads)


def _fit_layers(x, ys, fit_w, val_w, fit_rows, n_classes: int, *, l2, standardize, max_epochs, tol, history,
                patience, min_delta, seed, first_layer: int = 0):
    """Fit the probes of the layers of ``x`` [L, N, D] (layers ``first_layer``... of the caller's) together:
    (theta, epochs, converged, mean, scale)."""
    dev = x.device
    L, _, dim = x.shape
    n_val = int((val_w > 0).sum())
    threads = _pass_threads(x.numel())
    with _threads(dev, 1):
        raw_mean, raw_std = _fit_moments(x, (fit_w > 0).float(), threads)
        # 0 · NaN is NaN: the moments are finite exactly when every value is (bar overflow), so this read of the
        # features is also the input check.
        if not bool(torch.isfinite(raw_mean.sum() + raw_std.sum())):
            _raise_if_not_finite(x, first_layer=first_layer)
        raw_var = raw_std * raw_std
        if standardize:
            mean = raw_mean
            # A feature whose spread is within float32 round-off of its values is constant: scale 1, as
            # StandardScaler does for zero variance (dividing by the round-off would turn it into noise or a copy
            # of the bias).
            tiny = torch.maximum(1e-12 * raw_std.amax(1, keepdim=True), 8 * torch.finfo(x.dtype).eps * raw_mean.abs())
            scale = torch.where(raw_std > tiny.clamp_min(1e-30), raw_std, torch.ones_like(raw_std))
        else:
            mean = torch.zeros(L, dim, device=dev)
            scale = torch.ones(L, dim, device=dev)
        prob = _Problem(x, mean, scale, ys, fit_w, val_w, n_classes, l2, threads)
        K = 1 if n_classes == 2 else n_classes
        theta0 = torch.zeros(L, ys.shape[0], K, dim + 1, device=dev)
        # Early stopping regularizes through the optimizer's path (its first steps are gradient-like on the
        # standardized features), so that path stays plain; without it only the optimum matters, and a
        # preconditioner reaches it in a few times fewer passes.
        precond = None
        if not n_val:
            c = 0.25 if n_classes == 2 else 1.0 / n_classes
            # A random subset of the samples, enough to resolve a covariance of dim dimensions: more cost more
            # than they save.
            rows = fit_rows[: max(1024, 2 * dim)]
            precond = _Preconditioner(prob, rows, raw_mean, raw_var, c, l2, _SKETCH_RANK, seed)
        theta, epochs, converged = _lbfgs(
            prob, theta0, max_iter=max_epochs, tol=tol, history=history, early_stop=n_val > 0, patience=patience,
            min_delta=min_delta, precond=precond,
        )
    return theta, epochs, converged, mean, scale


def fit_probes(
    features,
    labels,
    *,
    l2: float = 1e-3,
    val_fraction: float = 0.1,
    max_epochs: int = 500,
    patience: int = 5,
    min_delta: float = 1e-4,
    tol: float = 1e-4,
    standardize: bool = True,
    n_classes: int | None = None,
    types=None,
    history: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LinearProbes:
    """Fit one L2-regularized logistic-regression probe per layer, all layers as one batched problem.

    features: [layers, samples, dim] (or [samples, dim] for one layer); labels: [samples] class indices
    0..C-1, the same for every layer.
    l2: the penalty on the mean-loss scale (scikit-learn's ``C = 1 / (l2 * n_fit)``).
    val_fraction: share of the samples held out for early stopping (0: no early stopping, fit to ``tol``).
    max_epochs: most full-batch L-BFGS iterations (two passes over the features each).
    patience, min_delta: stop a layer after ``patience`` iterations without its validation loss falling by
        ``min_delta``; each layer keeps the weights of its lowest validation loss.
    tol: a layer also stops when the largest entry of its gradient is below ``tol``.
    standardize: scale each feature to zero mean, unit variance on the fitted part first (the penalty then
        applies to standardized weights, as in ``make_pipeline(StandardScaler(), LogisticRegression())``).
    types: one input type per sample (e.g. a token id); fits control-task probes too (``probes.control``).
    device: where to fit (default: the features' device).
    """
    if l2 < 0:
        raise InputError(f"l2 must be >= 0, not {l2}")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if max_epochs < 1 or patience < 1:
        raise InputError("max_epochs and patience must be at least 1")
    x = _as_features(features, device=device, check_finite=False)  # the moments' pass checks (_fit_layers)
    dev = x.device
    L, n, dim = x.shape
    y, n_classes = _as_labels(labels, n, n_classes, device=dev)
    present = torch.unique(y)
    if present.numel() < 2:
        raise InputError(
            f"every label is class {int(present[0]) if present.numel() else '?'}: a probe needs at least two classes "
            "among the training samples; add samples of the other class(es)"
        )
    rows = [y]
    task = None
    if types is not None:
        keys = _type_keys(types)
        if len(keys) != n:
            raise InputError(f"{len(keys)} types for {n} samples; give one type per sample")
        task = ControlTask.like(y.cpu(), n_classes, seed=seed)
        ctrl = task.labels(keys).to(dev)
        if torch.unique(ctrl).numel() < 2:
            raise InputError(
                "the control task gave every sample the same label (too few distinct types); give types with more "
                "distinct values, or fit without types"
            )
        rows.append(ctrl)
    ys = torch.stack(rows)  # [T, n]

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(dev)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and (n_val < 1 or n - n_val < 2):
        raise InputError(
            f"{n} samples are too few to hold out {val_fraction:.0%} for early stopping; use val_fraction=0"
        )
    # Weights over all samples (1/n on a part, 0 elsewhere) rather than copies of the two parts: each pass then
    # reads the caller's features once and gives the fit and held-out logits together.
    n_fit = n - n_val
    fit_w = torch.zeros(n, device=dev).index_fill_(0, perm[n_val:], 1.0 / n_fit)
    val_w = torch.zeros(n, device=dev)
    if n_val:
        val_w.index_fill_(0, perm[:n_val], 1.0 / n_val)
    def fit(group: slice):
        return _fit_layers(x[group], ys, fit_w, val_w, perm[n_val:], n_classes, l2=l2, standardize=standardize,
                           max_epochs=max_epochs, tol=tol, history=history, patience=patience, min_delta=min_delta,
                           seed=seed, first_layer=group.start)

    fits = _map_groups(fit, _layer_groups(x), dev)
    theta, epochs, converged, mean, scale = (torch.cat(parts) for parts in zip(*fits))
    opts = dict(l2=l2, val_fraction=val_fraction, max_epochs=max_epochs, patience=patience, min_delta=min_delta,
                tol=tol, standardize=standardize, seed=seed)

    def probes(t: int) -> LinearProbes:
        return LinearProbes(
            weight=theta[:, t, :, :-1].transpose(1, 2).contiguous(), bias=theta[:, t, :, -1].contiguous(),
            mean=mean, scale=scale, n_classes=n_classes, l2=l2, epochs=epochs[:, t].cpu(),
            converged=converged[:, t].cpu(), options=opts,
        )

    out = probes(0)
    if task is not None:
        out.control = probes(1)
        out.control_task = task
    return out


__all__ = ["ControlTask", "LinearProbes", "fit_probes"]
