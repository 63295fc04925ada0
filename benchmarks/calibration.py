"""Batched calibration metrics against scikit-learn loops, side by side in one run.

A series of ``--checkpoints`` checkpoints x ``--answers`` answers (confidences rounded to 3 decimals, so ties
are common). scikit-learn scores one checkpoint at a time (``roc_auc_score``, ``average_precision_score``,
``brier_score_loss``; it has no ECE, so the loop side uses numpy's ``digitize`` + ``bincount``) and the
bootstrap interval of AUROC is a loop of ``roc_auc_score`` over resamples. The workbench scores the whole
series in one batched call per metric. Prints the time of each side, their ratio, and the largest difference
of the values (which must be at rounding level).

    python benchmarks/calibration.py [--checkpoints 40] [--answers 20000] [--bootstrap 200] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from workbench.probes import calibration as cal


def numpy_ece(conf: np.ndarray, right: np.ndarray, n_bins: int = 10) -> float:
    idx = np.clip(np.digitize(conf, np.arange(1, n_bins) / n_bins), 0, n_bins - 1)
    gap = np.bincount(idx, right, n_bins) - np.bincount(idx, conf, n_bins)
    return float(np.abs(gap).sum() / len(conf))


def timed(fn, repeats: int, sync):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=40)
    ap.add_argument("--answers", type=int, default=20000)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (scikit-learn uses one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    conf = (torch.rand(args.checkpoints, args.answers, generator=g, dtype=torch.float64) * 1000).round() / 1000
    right = (torch.rand(args.checkpoints, args.answers, generator=g, dtype=torch.float64) < conf**1.5).double()
    c_np, r_np = conf.numpy(), right.numpy()
    dev = torch.device(args.device)
    c_dev, r_dev = conf.to(dev), right.to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    cal.auroc(c_dev[:2], r_dev[:2])  # warm-up (CUDA context, kernels)

    print(f"{args.checkpoints} checkpoints x {args.answers} answers, device {dev}; best of {args.repeats}")
    print(f"{'metric':<22}{'reference s':>12}{'workbench s':>13}{'ratio':>8}{'max |diff|':>12}")
    rows = [
        ("AUROC", lambda: [roc_auc_score(r_np[i], c_np[i]) for i in range(len(c_np))], lambda: cal.auroc(c_dev, r_dev)),
        ("AUPRC", lambda: [average_precision_score(r_np[i], c_np[i]) for i in range(len(c_np))],
         lambda: cal.auprc(c_dev, r_dev)),
        ("Brier", lambda: [brier_score_loss(r_np[i], c_np[i]) for i in range(len(c_np))],
         lambda: cal.brier(c_dev, r_dev)),
        ("ECE (numpy loop)", lambda: [numpy_ece(c_np[i], r_np[i]) for i in range(len(c_np))],
         lambda: cal.ece(c_dev, r_dev)),
    ]
    for name, ref, ours in rows:
        t_ref, v_ref = timed(ref, args.repeats, sync)
        t_ours, v_ours = timed(ours, args.repeats, sync)
        diff = float(np.max(np.abs(np.asarray(v_ref) - v_ours.cpu().numpy())))
        print(f"{name:<22}{t_ref:>12.4f}{t_ours:>13.4f}{t_ours / t_ref:>8.3f}{diff:>12.2e}")

    # Bootstrap interval of AUROC at one checkpoint: a loop of roc_auc_score against one batched call.
    n = args.bootstrap
    idx = torch.randint(args.answers, (n, args.answers), generator=torch.Generator().manual_seed(0)).numpy()

    def ref_boot():
        vals = [roc_auc_score(r_np[0][i], c_np[0][i]) for i in idx]
        return np.quantile(vals, [0.025, 0.975])

    t_ref, v_ref = timed(ref_boot, 1, sync)
    t_ours, ci = timed(lambda: cal.bootstrap_ci(cal.auroc, c_dev[0], r_dev[0], n=n, seed=0), args.repeats, sync)
    # Same seed, same resamples (bootstrap_ci draws them in one chunk here): the endpoints must agree.
    diff = max(abs(v_ref[0] - float(ci.low)), abs(v_ref[1] - float(ci.high)))
    print(f"{f'AUROC bootstrap x{n}':<22}{t_ref:>12.4f}{t_ours:>13.4f}{t_ours / t_ref:>8.3f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
