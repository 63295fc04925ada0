"""Pathway distances: this project's time divided by calling rapidfuzz directly, and the memory of a group mean.

1. All-pairs char-unit distances of 2,000 pathways of 16 MoE layers with 1 to 8 experts per layer (of 64):
   ``pairwise_distances(paths)`` (from the Pathways tensors: text forms built, matrix returned as a tensor)
   against ``rapidfuzz.process.cdist(texts, texts, scorer=Levenshtein.distance, workers=-1)`` on text forms
   built beforehand. Side by side in one process, alternating, best of several repeats. Target <= 1.0.
   The expert unit is shown beside it: ours (one code point per (layer, expert) symbol) against rapidfuzz on
   lists of (layer, expert) tuples, the obvious way to call it.
2. Peak memory of ``group_mean_distance`` over 20,000 pathways (default: 200,000 pairs drawn with a seed),
   in a fresh child process: Python/numpy allocations (tracemalloc) and growth of the peak resident set
   (VmHWM after resetting it, on Linux), beside the 1.6 GB an all-pairs int32 matrix would take.

    python benchmarks/pathways.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

from workbench.probes.pathways import Pathways, group_mean_distance, pairwise_distances, pathways


def random_pathways(n: int, layers: int = 16, experts: int = 64, max_k: int = 8, seed: int = 0) -> Pathways:
    """Routing weights with 1..max_k experts of non-zero weight per layer; at tau = 1 each pathway is exactly
    those experts, in weight order."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, max_k + 1, (n, layers), generator=g)
    scores = torch.rand(n, layers, experts, generator=g)
    order = scores.argsort(-1)
    keep = torch.zeros(n, layers, experts, dtype=torch.bool).scatter_(
        -1, order, torch.arange(experts).expand(n, layers, experts) < k.unsqueeze(-1))
    w = torch.where(keep, torch.rand(n, layers, experts, generator=g) + 0.05, 0.0)
    return pathways(w / w.sum(-1, keepdim=True), tau=1.0)


def best_of(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(v) for name, v in times.items()}


def speed(repeats: int) -> None:
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    paths = random_pathways(2000)
    texts = paths.texts()
    tuples = [[(layer, e) for layer, es in enumerate(p) for e in es] for p in paths.tolist()]
    print(f"2,000 pathways x 16 layers, 1-8 of 64 experts per layer; mean text length "
          f"{np.mean([len(t) for t in texts]):.0f} chars, {np.mean([len(t) for t in tuples]):.1f} symbols; "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    ours = pairwise_distances(paths)
    ref = process.cdist(texts, texts, scorer=Levenshtein.distance, workers=-1)
    assert np.array_equal(ours.numpy(), ref), "the distances differ from rapidfuzz"
    t = best_of({
        "ours": lambda: pairwise_distances(paths),
        "rapidfuzz": lambda: process.cdist(texts, texts, scorer=Levenshtein.distance, workers=-1),
    }, repeats)
    print(f"char unit, all pairs: ours {t['ours']:.3f} s, rapidfuzz cdist {t['rapidfuzz']:.3f} s, "
          f"ratio {t['ours'] / t['rapidfuzz']:.3f} (target <= 1.0)")

    sub = paths.select(torch.arange(1000))
    sub_tuples = tuples[:1000]
    ours_e = pairwise_distances(sub, unit="expert")
    ref_e = process.cdist(sub_tuples, sub_tuples, scorer=Levenshtein.distance, workers=-1)
    assert np.array_equal(ours_e.numpy(), ref_e), "expert-unit distances differ from rapidfuzz"
    t = best_of({
        "ours": lambda: pairwise_distances(sub, unit="expert"),
        "rapidfuzz": lambda: process.cdist(sub_tuples, sub_tuples, scorer=Levenshtein.distance, workers=-1),
    }, repeats)
    print(f"expert unit, all pairs of 1,000 (rapidfuzz on (layer, expert) tuples): ours {t['ours']:.3f} s, "
          f"rapidfuzz cdist {t['rapidfuzz']:.3f} s, ratio {t['ours'] / t['rapidfuzz']:.3f}")

    if torch.cuda.is_available():
        gpu = paths.to("cuda")
        torch.testing.assert_close(pairwise_distances(gpu).cpu(), ours)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pairwise_distances(gpu)
        torch.cuda.synchronize()
        print(f"char unit on {torch.cuda.get_device_name()}: torch DP {time.perf_counter() - t0:.3f} s")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def memory_child() -> None:
    paths = random_pathways(20_000, seed=1)
    # peak RSS from here on (Linux: writing 5 to clear_refs resets VmHWM); elsewhere ru_maxrss, less exact
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0, peak = _status_mb("VmRSS"), lambda: _status_mb("VmHWM")
    except OSError:
        rss0, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, \
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    t = time.perf_counter()
    mean = group_mean_distance(paths)  # 200,000 pairs drawn with seed 0
    seconds = time.perf_counter() - t
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"mean": mean, "seconds": seconds, "tracemalloc_peak_mb": traced / 2**20,
                      "rss_peak_growth_mb": peak() - rss0}))


def memory() -> None:
    out = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    full = 20_000 ** 2 * 4 / 2**20
    print(f"group mean over 20,000 pathways (200,000 sampled pairs): {r['seconds']:.2f} s, mean distance "
          f"{r['mean']:.1f}; peak Python/numpy allocations {r['tracemalloc_peak_mb']:.1f} MB, peak RSS growth "
          f"{r['rss_peak_growth_mb']:.1f} MB (an all-pairs int32 matrix alone: {full:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child", action="store_true")
    args = ap.parse_args()
    if args.memory_child:
        memory_child()
        return
    speed(args.repeats)
    memory()


if __name__ == "__main__":
    main()
