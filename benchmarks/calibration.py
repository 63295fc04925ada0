"""Batched calibration metrics against scikit-learn loops, side by side in one run.

A series of ``--checkpoints`` checkpoints x ``--answers`` answers (confidences rounded to 3 decimals, so ties
are common). scikit-learn scores one checkpoint at a time (``roc_auc_score``, ``average_precision_score``,
``brier_score_loss``; it has no ECE, so the loop side uses numpy's ``digitize`` + ``bincount``) and the
bootstrap interval of AUROC is a loop of ``roc_auc_score`` over resamples. The workbench scores the whole
series in one batched call per metric. Both sides get the same thread budget: torch's intra-op threads for
the workbench; for the reference, its loop runs in sequence or spread over the budget with joblib threads or
processes, whichever is fastest here (tried before timing). Both are warmed up and timed in interleaved
rounds (``_timing``); printed per metric: the median paired ratio with quartiles, and the largest difference
of the values (which must be at rounding level).

    python benchmarks/calibration.py [--checkpoints 40] [--answers 20000] [--bootstrap 200] [--device cpu] [--threads N] [--tiny]
"""

from __future__ import annotations

import numpy as np
import torch
from joblib import Parallel, delayed
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

import _timing
from workbench.probes import calibration as cal


def numpy_ece(conf: np.ndarray, right: np.ndarray, n_bins: int = 10) -> float:
    idx = np.clip(np.digitize(conf, np.arange(1, n_bins) / n_bins), 0, n_bins - 1)
    gap = np.bincount(idx, right, n_bins) - np.bincount(idx, conf, n_bins)
    return float(np.abs(gap).sum() / len(conf))


def fastest_loop(fn, items, threads: int):
    """The reference loop ``[fn(*item) for item in items]`` at its fastest here: in sequence, or over
    ``threads`` joblib threads or processes. Returns the setting's name and a function running it."""
    items = list(items)
    settings = {"in sequence": lambda: [fn(*it) for it in items]}
    if threads > 1:
        for backend in ("threading", "loky"):
            settings[f"over {threads} joblib {'threads' if backend == 'threading' else 'processes'}"] = (
                lambda backend=backend: Parallel(n_jobs=threads, backend=backend)(delayed(fn)(*it) for it in items))
    best, _ = _timing.fastest(settings, rounds=2)
    return best, settings[best]


def main() -> None:
    ap = _timing.arguments(__doc__)
    ap.add_argument("--checkpoints", type=int, default=40)
    ap.add_argument("--answers", type=int, default=20000)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.tiny:
        args.checkpoints, args.answers, args.bootstrap = 4, 500, 10
    _timing.set_thread_budget(args.threads)
    _timing.header("calibration metrics: batched over checkpoints against scikit-learn per checkpoint", args.threads)

    g = torch.Generator().manual_seed(0)
    conf = (torch.rand(args.checkpoints, args.answers, generator=g, dtype=torch.float64) * 1000).round() / 1000
    right = (torch.rand(args.checkpoints, args.answers, generator=g, dtype=torch.float64) < conf**1.5).double()
    c_np, r_np = conf.numpy(), right.numpy()
    dev = torch.device(args.device)
    c_dev, r_dev = conf.to(dev), right.to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    print(f"   {args.checkpoints} checkpoints x {args.answers} answers, workbench on {dev}")
    per_checkpoint = [(r_np[i], c_np[i]) for i in range(len(c_np))]
    rows = [
        ("AUROC", roc_auc_score, lambda: cal.auroc(c_dev, r_dev)),
        ("AUPRC", average_precision_score, lambda: cal.auprc(c_dev, r_dev)),
        ("Brier", brier_score_loss, lambda: cal.brier(c_dev, r_dev)),
        ("ECE (numpy loop)", lambda r, c: numpy_ece(c, r), lambda: cal.ece(c_dev, r_dev)),
    ]
    for name, metric, ours in rows:
        setting, ref = fastest_loop(metric, per_checkpoint, args.threads)
        cmp = _timing.side_by_side({"workbench": ours, "reference": ref}, "reference", sync=sync,
                                   **_timing.limits(args))
        diff = float(np.max(np.abs(np.asarray(ref()) - ours().cpu().numpy())))
        _timing.report(f"calibration {name}, workbench / scikit-learn ({setting})", cmp, "workbench")
        print(f"      largest difference of the values {diff:.2e}")

    # Bootstrap interval of AUROC at one checkpoint: a loop of roc_auc_score against one batched call.
    n = args.bootstrap
    idx = torch.randint(args.answers, (n, args.answers), generator=torch.Generator().manual_seed(0)).numpy()
    setting, boot = fastest_loop(roc_auc_score, [(r_np[0][i], c_np[0][i]) for i in idx], args.threads)

    def ref_boot():
        return np.quantile(boot(), [0.025, 0.975])

    def ours_boot():
        return cal.bootstrap_ci(cal.auroc, c_dev[0], r_dev[0], n=n, seed=0)

    cmp = _timing.side_by_side({"workbench": ours_boot, "reference": ref_boot}, "reference", sync=sync,
                               **_timing.limits(args))
    v_ref, ci = ref_boot(), ours_boot()
    # Same seed, same resamples (bootstrap_ci draws them in one chunk here): the endpoints must agree.
    diff = max(abs(v_ref[0] - float(ci.low)), abs(v_ref[1] - float(ci.high)))
    _timing.report(f"calibration AUROC bootstrap x{n}, workbench / scikit-learn ({setting})", cmp, "workbench")
    print(f"      largest difference of the interval's ends {diff:.2e}")
    _timing.footer()


if __name__ == "__main__":
    main()
