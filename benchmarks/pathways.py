"""Pathway distances: this project's time divided by calling rapidfuzz directly, and the memory of a group mean.

1. All-pairs distances of 2,000 pathways of 16 MoE layers with 1 to 8 experts per layer (of 64), in both
   units, from the Pathways tensors (``pairwise_distances(paths, unit=...)``: strings built, matrix returned
   as a tensor) against rapidfuzz given the same strings, built beforehand, at its fastest documented
   setting: ``process.cdist(s, s, scorer=Levenshtein.distance, workers=<thread budget>, dtype=np.int32)``
   with the same list object twice (rapidfuzz then computes one triangle of the symmetric matrix). The
   char unit's strings are the text forms ("3,1,5-9,1"); the expert unit's are the same code-point strings
   the workbench builds (one code point per (layer, expert) symbol, rapidfuzz's fastest input). Interleaved
   rounds, median of the paired ratios with quartiles (``_timing``). Target <= 1.0.
2. Peak memory of ``group_mean_distance`` over 20,000 pathways (default: 200,000 pairs drawn with a seed),
   in a fresh child process: Python/numpy allocations (tracemalloc) and growth of the peak resident set
   (VmHWM after resetting it, on Linux), beside the 1.6 GB an all-pairs int32 matrix would take.

    python benchmarks/pathways.py [--threads N] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import torch

import _timing
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


def speed(n: int, layers: int, threads: int, limits: dict) -> None:
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    paths = random_pathways(n, layers)
    strings = {"char": paths.texts(), "expert": paths.symbols()}
    print(f"   {n:,} pathways x {layers} layers, 1-8 of 64 experts per layer; mean length "
          f"{np.mean([len(t) for t in strings['char']]):.0f} chars, "
          f"{np.mean([len(t) for t in strings['expert']]):.1f} symbols")
    for unit, s in strings.items():
        def reference(s=s):
            return process.cdist(s, s, scorer=Levenshtein.distance, workers=threads, dtype=np.int32)

        def ours(unit=unit):
            return pairwise_distances(paths, unit=unit)

        assert np.array_equal(ours().numpy(), reference()), f"{unit}-unit distances differ from rapidfuzz"
        cmp = _timing.side_by_side({"workbench": ours, "rapidfuzz": reference}, "rapidfuzz", **limits)
        _timing.report(f"pathways all pairs of {n:,}, {unit} unit, workbench / rapidfuzz cdist", cmp, "workbench",
                       target="<= 1.0" if unit == "char" else "")

    if torch.cuda.is_available():
        gpu = paths.to("cuda")
        torch.testing.assert_close(pairwise_distances(gpu).cpu(), pairwise_distances(paths))
        cmp = _timing.side_by_side({"torch DP on CUDA": lambda: pairwise_distances(gpu),
                                    "rapidfuzz": lambda: process.cdist(strings["char"], strings["char"],
                                                                       scorer=Levenshtein.distance, workers=threads,
                                                                       dtype=np.int32)},
                                   "rapidfuzz", sync=torch.cuda.synchronize, **limits)
        _timing.report(f"pathways all pairs of {n:,}, char unit, {torch.cuda.get_device_name()} / rapidfuzz", cmp,
                       "torch DP on CUDA")


def memory_child(n: int, max_pairs: int) -> None:
    paths = random_pathways(n, seed=1)
    tracemalloc.start()
    t = time.perf_counter()
    mean, rss = _timing.peak_rss_growth(lambda: group_mean_distance(paths, max_pairs=max_pairs))
    seconds = time.perf_counter() - t
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"mean": mean, "seconds": seconds, "tracemalloc_peak_mb": traced / 2**20,
                      "rss_peak_growth_mb": rss}))


def memory(n: int, max_pairs: int) -> None:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--max-pairs", str(max_pairs)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    full = n ** 2 * 4 / 2**20
    print(f"   group mean over {n:,} pathways ({max_pairs:,} sampled pairs): {r['seconds']:.2f} s, mean distance "
          f"{r['mean']:.1f}; peak Python/numpy allocations {r['tracemalloc_peak_mb']:.1f} MB, peak RSS growth "
          f"{r['rss_peak_growth_mb'] or float('nan'):.1f} MB (an all-pairs int32 matrix alone: {full:.0f} MB)")


def main() -> None:
    ap = _timing.arguments(__doc__)
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-pairs", type=int, default=200_000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.max_pairs)
        return
    _timing.set_thread_budget(args.threads)
    _timing.header("pathway distances: workbench against rapidfuzz called directly", args.threads)
    if args.tiny:
        speed(100, 4, args.threads, _timing.limits(args))
        memory(1000, 2000)
    else:
        speed(2000, 16, args.threads, _timing.limits(args))
        memory(20_000, 200_000)
    _timing.footer()


if __name__ == "__main__":
    main()
