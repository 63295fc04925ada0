"""Linear probes at every layer at once (SPEC section 3; Zhang, Choshen & Andreas, arXiv 2409.02228).

:func:`fit_probes` trains one L2-regularized logistic regression per layer on features ``[layers, samples,
dim]`` and labels ``[samples]``, with early stopping on a held-out part of the training data. All layers
are one batched problem: each step is one batched matrix product over every layer, and each layer keeps
its own L-BFGS curvature history, step length and stopping point, so a layer that converges or stops early
does not change the others' result. The objective of one layer is, on standardized features,

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
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import InputError, NumericalError

# --- input checks (at the boundary only) ----------------------------------------------------------------


def _as_features(features, name: str = "features", device=None) -> torch.Tensor:
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
    if not bool(torch.isfinite(x.sum())) and bool((bad := ~torch.isfinite(x)).any()):
        layer, sample, dim = (int(v) for v in bad.nonzero()[0])
        raise InputError(
            f"{name} hold NaN or infinite values ({int(bad.sum())} of them, the first at layer {layer}, sample "
            f"{sample}, dim {dim}); capture the hidden states again in float32, or drop those samples"
        )
    return x


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
    """Per-problem inner product of parameters shaped [L, D+1, T, K] → [L, T]."""
    return (a * b).sum(dim=(1, 3))


def _bc(v: torch.Tensor) -> torch.Tensor:
    """A per-problem scalar [L, T] broadcast against parameters [L, D+1, T, K]."""
    return v[:, None, :, None]


class _Objective:
    """Mean cross-entropy + l2/2 ||W||² of every (layer, label row) problem at once.

    ``theta`` is [L, D+1, T, K]: row D is the bias. K = 1 for two classes (a logit and the sigmoid, as
    scikit-learn's binary model), else K = C (the softmax).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float):
        self.x = x  # [L, n, D]
        self.y = y  # [T, n]
        self.binary = n_classes == 2
        self.l2 = l2
        self.n = x.shape[1]
        if self.binary:
            self.yf = y.t().float()[None]  # [1, n, T]
        else:
            self.onehot = F.one_hot(y.t(), n_classes).float()[None]  # [1, n, T, C]

    def logits(self, theta: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        L, d1, T, K = theta.shape
        # As (W^T X^T)^T: with few outputs, CPU batched matmul is several times faster in this orientation.
        wt = theta[:, :-1].reshape(L, d1 - 1, T * K).transpose(1, 2)
        b = theta[:, -1].reshape(L, T * K, 1)
        return torch.baddbmm(b, wt, x.transpose(1, 2)).transpose(1, 2).reshape(L, x.shape[1], T, K)

    def data_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per problem [L, T] of logits [L, n, T, K] against labels [T, n]."""
        if self.binary:
            zz = z[..., 0]
            return (F.softplus(zz) - y.t().float()[None] * zz).mean(1)
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(-1, y.t()[None, :, :, None].expand(z.shape[0], -1, -1, 1))[..., 0]
        return (lse - picked).mean(1)

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [L, T] and gradient (like ``theta``)."""
        L, d1, T, K = theta.shape
        z = self.logits(theta)
        w = theta[:, :-1]
        if self.binary:
            zz = z[..., 0]  # [L, n, T]
            loss = (F.softplus(zz) - self.yf * zz).mean(1)
            gz = (torch.sigmoid(zz) - self.yf) / self.n  # [L, n, T]
        else:
            logp = torch.log_softmax(z, dim=-1)
            loss = -(logp * self.onehot).sum(-1).mean(1)
            gz = (logp.exp() - self.onehot) / self.n  # [L, n, T, C]
        gz = gz.reshape(L, self.n, T * K)
        grad = torch.empty_like(theta)
        # G^T X rather than X^T G: the same product, several times faster on CPU (X is read row by row).
        grad[:, :-1] = torch.bmm(gz.transpose(1, 2), self.x).transpose(1, 2).reshape(L, d1 - 1, T, K) + self.l2 * w
        grad[:, -1] = gz.sum(1).view(L, T, K)
        loss = loss + 0.5 * self.l2 * (w * w).sum(dim=(1, 3))
        return loss, grad


def _lbfgs(
    obj: _Objective,
    theta: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    history: int,
    val: _Objective | None,
    patience: int,
    min_delta: float,
    ftol: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimize every problem of ``obj`` from ``theta``; each problem has its own curvature pairs, Armijo
    backtracking step and stopping point. With ``val``, each problem keeps the parameters of its lowest
    validation loss and stops after ``patience`` iterations without an improvement of ``min_delta``.

    Returns the parameters, the iteration each problem's result comes from, and whether it converged.
    """
    f, g = obj(theta)
    L, T = f.shape
    dev = theta.device
    active = torch.ones(L, T, dtype=torch.bool, device=dev)
    converged = torch.zeros(L, T, dtype=torch.bool, device=dev)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    gamma = torch.ones(L, T, device=dev)
    best_it = torch.zeros(L, T, dtype=torch.long, device=dev)
    if val is not None:
        best = val.data_loss(val.logits(theta, val.x), val.y)
        best_theta = theta.clone()
        stall = torch.zeros(L, T, dtype=torch.long, device=dev)
    for it in range(1, max_iter + 1):
        # Two-loop recursion, per problem (a pair with rho = 0 is skipped for its problem).
        q = g.clone()
        alphas = []
        for s, y, r in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = r * _pdot(s, q)
            q -= _bc(a) * y
            alphas.append(a)
        d = _bc(gamma) * q
        for s, y, r, a in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            beta = r * _pdot(y, d)
            d += _bc(a - beta) * s
        d = -d
        gd = _pdot(g, d)
        uphill = gd >= 0  # not a descent direction (rare, from round-off): steepest descent instead
        if bool(uphill.any()):
            d = torch.where(_bc(uphill), -g, d)
            gd = torch.where(uphill, -_pdot(g, g), gd)
        d = d * _bc(active.float())
        # The first step has no curvature to scale it; keep it short as torch's LBFGS does.
        t = torch.ones(L, T, device=dev) if s_hist else (1.0 / g.abs().sum(dim=(1, 3)).clamp_min(1.0))
        todo = active.clone()
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        for _ in range(20):  # Armijo backtracking; candidates evaluated for every problem at once
            cand = theta + _bc(t) * d
            fc, gc = obj(cand)
            ok = todo & (fc <= f + 1e-4 * t * gd) & torch.isfinite(fc)
            if bool(ok.any()):
                new_theta = torch.where(_bc(ok), cand, new_theta)
                new_f = torch.where(ok, fc, new_f)
                new_g = torch.where(_bc(ok), gc, new_g)
                todo &= ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, t * 0.5, t)
        # A problem whose line search found no decrease is at its optimum to round-off: stop it.
        converged |= todo
        active &= ~todo
        s = new_theta - theta
        y = new_g - g
        sy = _pdot(s, y)
        good = sy > 1e-10 * _pdot(y, y).clamp_min(1e-30).sqrt() * _pdot(s, s).clamp_min(1e-30).sqrt()
        rho = torch.where(good, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        gamma = torch.where(good, sy / _pdot(y, y).clamp_min(1e-30), gamma)
        s_hist.append(s)
        y_hist.append(y)
        rho_hist.append(rho)
        if len(s_hist) > history:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        # Stop where the gradient is small, or where the loss no longer falls beyond float32 round-off
        # (scipy's L-BFGS-B 'factr' test): a stricter tol cannot be met in float32.
        stalled = active & ((f - new_f) <= ftol * torch.maximum(f.abs(), new_f.abs()).clamp_min(1.0))
        theta, f, g = new_theta, new_f, new_g
        if not bool(torch.isfinite(f).all()):
            raise NumericalError("the probe's loss became NaN or infinite; standardize the features or raise l2")
        done = (g.abs().amax(dim=(1, 3)) <= tol) | stalled
        converged |= done & active
        if val is not None:
            vl = val.data_loss(val.logits(theta, val.x), val.y)
            better = active & (vl < best - min_delta)
            best = torch.where(better, vl, best)
            best_theta = torch.where(_bc(better), theta, best_theta)
            best_it = torch.where(better, it, best_it)
            stall = torch.where(better, 0, stall + active.long())
            active &= stall < patience
        else:
            best_it = torch.where(active, it, best_it)
        active &= ~done
        if not bool(active.any()):
            break
    return (best_theta if val is not None else theta), best_it, converged


@contextlib.contextmanager
def _few_threads_if_small(device: torch.device, numel: int, small: int = 1 << 21):
    """One CPU thread for small problems: their operations take microseconds, and waking a thread pool for each
    costs more than that (milliseconds when the cores are shared with other work)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or numel >= small or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


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
        x = (self._check(features) - self.mean[:, None]) / self.scale[:, None]
        with _few_threads_if_small(x.device, x.numel()):
            return torch.baddbmm(self.bias[:, None], x, self.weight)

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
    max_epochs: most full-batch L-BFGS iterations (one pass over the data each).
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
    x = _as_features(features, device=device)
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
    fit_idx, val_idx = perm[n_val:], perm[:n_val]
    x_fit = x.index_select(1, fit_idx)  # a copy, standardized in place below
    if standardize:
        mean = x_fit.mean(1)
        x_fit.sub_(mean[:, None])
        scale = torch.linalg.vector_norm(x_fit, dim=1) / x_fit.shape[1] ** 0.5  # population std, as StandardScaler
        scale = torch.where(scale > 1e-12 * scale.amax(1, keepdim=True).clamp_min(1e-30), scale, torch.ones_like(scale))
        x_fit.div_(scale[:, None])
    else:
        mean = torch.zeros(L, dim, device=dev)
        scale = torch.ones(L, dim, device=dev)
    obj = _Objective(x_fit, ys[:, fit_idx], n_classes, l2)
    val = None
    if n_val:
        x_val = x.index_select(1, val_idx).sub_(mean[:, None]).div_(scale[:, None])
        val = _Objective(x_val, ys[:, val_idx], n_classes, l2)
    K = 1 if n_classes == 2 else n_classes
    theta0 = torch.zeros(L, dim + 1, ys.shape[0], K, device=dev)
    with _few_threads_if_small(dev, x_fit.numel()):
        theta, epochs, converged = _lbfgs(
            obj, theta0, max_iter=max_epochs, tol=tol, history=history, val=val, patience=patience,
            min_delta=min_delta,
        )
    opts = dict(l2=l2, val_fraction=val_fraction, max_epochs=max_epochs, patience=patience, min_delta=min_delta,
                tol=tol, standardize=standardize, seed=seed)

    def probes(t: int) -> LinearProbes:
        return LinearProbes(
            weight=theta[:, :-1, t].contiguous(), bias=theta[:, -1, t].contiguous(), mean=mean, scale=scale,
            n_classes=n_classes, l2=l2, epochs=epochs[:, t].cpu(), converged=converged[:, t].cpu(), options=opts,
        )

    out = probes(0)
    if task is not None:
        out.control = probes(1)
        out.control_task = task
    return out


__all__ = ["ControlTask", "LinearProbes", "fit_probes"]
