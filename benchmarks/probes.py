"""Batched all-layer probes against scikit-learn, side by side in one run.

12 layers x 5,000 samples x 768 dims (hidden-state-like features: a low-rank signal shared across layers,
anisotropic noise, a few outlier dimensions, labels that are a noisy linear function of the signal, with the
signal growing with depth). scikit-learn fits ``make_pipeline(StandardScaler(), LogisticRegression(C=...))``
once per layer, with ``C = 1 / (l2 * n)``: the same standardization and the same penalty as
:func:`workbench.probes.linear.fit_probes`. The probes run twice: with the same objective as scikit-learn (no
held-out part, the same gradient tolerance 1e-4), and with their default early stopping on a held-out 10%.
All are scored on the same 20% test split.

Prints the time ratio (target <= 0.05) against scikit-learn at its default BLAS threads and at its faster
setting, and the largest accuracy difference over layers (target <= 1 point).
The probes run on CUDA when present, else on the CPU; scikit-learn always runs on the CPU.

    python benchmarks/probes.py [--layers 12] [--samples 5000] [--dim 768] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from workbench.probes.linear import fit_probes


def hidden_like(layers: int, samples: int, dim: int, rank: int = 32, seed: int = 0):
    """Features [layers, samples, dim] and binary labels [samples], harder to probe in early layers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, rank, generator=g)
    v = torch.randn(rank, generator=g)
    logit = z @ v / v.norm()
    y = (logit + 0.6 * torch.randn(samples, generator=g) > 0).long()
    x = torch.empty(layers, samples, dim)
    for layer in range(layers):
        a = torch.randn(rank, dim, generator=g) / rank**0.5
        snr = 0.15 + 0.85 * layer / max(1, layers - 1)
        noise = torch.randn(samples, dim, generator=g) * torch.exp(0.5 * torch.randn(dim, generator=g))
        x[layer] = snr * (z @ a) + noise
        outliers = torch.randperm(dim, generator=g)[:4]
        x[layer, :, outliers] = x[layer, :, outliers] * 30 + 50  # the massive activations of real LMs
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs of the probes")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both torch and scikit-learn's BLAS")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    x, y = hidden_like(args.layers, args.samples, args.dim)
    n_train = int(0.8 * args.samples)
    xtr, ytr, xte, yte = x[:, :n_train], y[:n_train], x[:, n_train:], y[n_train:]
    dev = torch.device(args.device)
    xtr_d, xte_d = xtr.to(dev), xte.to(dev)

    # Two settings of the probes: the same objective as scikit-learn (no held-out part, the same gradient
    # tolerance), and the default (10% held out, early stopping), which regularizes more than the penalty alone.
    settings = {"same objective": dict(val_fraction=0.0, tol=1e-4), "early stopping": dict(val_fraction=0.1)}
    fit_probes(xtr_d[:, :256], ytr[:256], l2=args.l2, max_epochs=3)  # warm-up (CUDA context, kernels)
    ours = {}
    for label, kw in settings.items():
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            probes = fit_probes(xtr_d, ytr, l2=args.l2, **kw)
            acc = probes.accuracy(xte_d, yte).cpu()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ours[label] = (min(times), acc, probes.epochs)

    # scikit-learn on every training sample, with the penalty of the same objective (C = 1 / (l2 * n)), twice:
    # with its BLAS at its default thread count and at one thread. On small problems OpenBLAS's threading can
    # cost more than it gains (10x here on 2 cores), so the faster of the two is the fair reference.
    def sklearn_fit(blas_threads):
        accs, iters = [], []
        t0 = time.perf_counter()
        with warnings.catch_warnings(), threadpool_limits(blas_threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            for layer in range(args.layers):
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 / (args.l2 * n_train), max_iter=1000))
                clf.fit(xtr[layer].numpy(), ytr.numpy())
                accs.append(float((clf.predict(xte[layer].numpy()) == yte.numpy()).mean()))
                iters.append(int(clf[-1].n_iter_[0]))
        return time.perf_counter() - t0, torch.tensor(accs), iters

    sk_default, sk_acc, sk_iters = sklearn_fit(None)
    sk_one, _, _ = sklearn_fit(1)
    sk = min(sk_default, sk_one)

    print(f"problem: {args.layers} layers x {args.samples} samples x {args.dim} dims ({n_train} train, "
          f"{args.samples - n_train} test), l2={args.l2} (sklearn C={1.0 / (args.l2 * n_train):.4g}); probes on "
          f"{dev}, torch threads {torch.get_num_threads()}; sklearn on the CPU")
    head = f"{'layer':>5} {'sklearn':>8} {'iters':>5}"
    for label in settings:
        head += f" | {label:>15} {'epochs':>6}"
    print(head)
    for layer in range(args.layers):
        line = f"{layer:>5} {sk_acc[layer]:>8.4f} {sk_iters[layer]:>5}"
        for label in settings:
            _, acc, ep = ours[label]
            line += f" | {acc[layer]:>15.4f} {int(ep[layer]):>6}"
        print(line)
    print(f"sklearn, one layer at a time: {sk_default:.3f} s with its default BLAS threads, {sk_one:.3f} s with one")
    for label, (t, acc, _) in ours.items():
        diff = 100 * float((acc - sk_acc).abs().max())
        print(f"probes, {label}: {t:.3f} s (best of {args.repeats}); time ratio {t / sk_default:.4f} against "
              f"sklearn's default, {t / sk:.4f} against its faster setting (target <= 0.05); "
              f"largest accuracy difference over layers {diff:.2f} points"
              + (" (target <= 1)" if label == "same objective" else " (early stopping is extra regularization)"))


if __name__ == "__main__":
    main()
