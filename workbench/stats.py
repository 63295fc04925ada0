"""Statistics the probe families share."""

from __future__ import annotations

import math

import numpy as np

from workbench.errors import InputError

METHODS = ("pearson", "spearman")


def correlation(x, y, method: str = "spearman") -> tuple[float, float]:
    """Pearson or Spearman correlation of two series and its two-sided p-value, pairs with a NaN or an infinity
    left out. (NaN, NaN) when either series is constant; at least 3 pairs are needed."""
    # scipy.stats takes about half a second to import: only when a correlation is asked for.
    from scipy import stats

    if method not in METHODS:
        raise InputError(f"method must be 'pearson' or 'spearman', not {method!r}")
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"the two series must be 1-D with one value per point each; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        raise InputError(f"a correlation needs at least 3 points with both values, got {int(keep.sum())}")
    a, b = a[keep], b[keep]
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    r = stats.pearsonr(a, b) if method == "pearson" else stats.spearmanr(a, b)
    return float(r.statistic), float(r.pvalue)


__all__ = ["METHODS", "correlation"]
