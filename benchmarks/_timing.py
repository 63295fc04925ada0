"""Side-by-side timing shared by every benchmark: interleaved rounds, medians with their spread, peak memory.

A benchmark hands :func:`side_by_side` one callable per side (the workbench and its reference). Each round
runs every side once, in an order that rotates from round to round, so that both see the same machine state
(frequency, caches, other load); the ratio of each round is one paired ratio. Rounds go on until the 95%
confidence interval of the median paired ratio is within ±2.5% (two runs of the benchmark then agree within
about 5%) or a round or time cap is reached, which the report then says. Every number comes with its
spread: the quartiles of the rounds.

Each benchmark also takes ``--tiny`` (or ``WORKBENCH_BENCH_TINY=1``): a size that runs in seconds, for the
smoke tests that keep the benchmarks from rotting; its ratios mean nothing.

Output lines that start with ``ratio`` are the benchmark's results, in one format::

    ratio <what> = <median> [<q1>-<q3>] ...
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

TINY_ENV = "WORKBENCH_BENCH_TINY"


def tiny_requested() -> bool:
    return os.environ.get(TINY_ENV, "") not in ("", "0")


def arguments(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares: --tiny, --threads, --max-rounds."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", default=tiny_requested(),
                    help=f"a seconds-long smoke run (also ${TINY_ENV}=1); its ratios mean nothing")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="the thread budget of each side (default: every core)")
    ap.add_argument("--max-rounds", type=int, default=None, help="most interleaved rounds per comparison")
    return ap


def limits(args) -> dict:
    """Round limits for :func:`side_by_side`: a couple of rounds for ``--tiny``, else up to ``--max-rounds``."""
    if args.tiny:
        return dict(min_rounds=2, max_rounds=2, min_time=0.0, rel_ci=math.inf)
    return dict(max_rounds=args.max_rounds or 41)


def set_thread_budget(threads: int) -> None:
    """Give torch ``threads`` intra-op threads (the reference sides take the same budget their own way)."""
    import torch

    torch.set_num_threads(threads)


def load() -> str:
    """The 1-minute load average against the core count, for the record beside every timing."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} on {os.cpu_count()} cores"


def _busy_seconds() -> float | None:
    """CPU seconds every process on the machine has run since boot (Linux /proc/stat: user, nice, system, irq,
    softirq, steal), or None where that is not readable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / ticks


def _own_seconds() -> float:
    """CPU seconds of this process and its child processes: those waited for, and (with psutil) those still
    running, such as the worker processes joblib keeps for reuse."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # it ended meanwhile
            continue
        total += c.user + c.system
    return total


_START: dict = {}


def header(what: str, threads: int) -> None:
    print(f"== {what}")
    print(f"   thread budget {threads} per side; {load()} at the start")
    _START.update(wall=time.perf_counter(), busy=_busy_seconds(), own=_own_seconds())


def footer() -> None:
    """The load at the end, and the cores other processes used while the benchmark ran, with a warning when they
    used a noticeable share: such numbers are not final. (The load average alone cannot tell: the benchmark's
    own threads raise it to the thread budget.)"""
    print(f"   {load()} at the end")
    busy = _busy_seconds()
    if busy is None or _START.get("busy") is None:
        return
    wall = time.perf_counter() - _START["wall"]
    others = max(0.0, (busy - _START["busy"]) - (_own_seconds() - _START["own"])) / max(wall, 1e-9)
    cores = os.cpu_count() or 1
    print(f"   other processes used {others:.2f} of {cores} cores on average while it ran" + (
        "; the machine was busy: these timings are noise, not final numbers" if others > 0.1 * cores else ""))


# --- interleaved rounds --------------------------------------------------------------------------------------


@dataclass
class Spread:
    """Median and quartiles of a list of values."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.values) < 2:
            return self.values[0], self.values[0]
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    def ci95(self) -> tuple[float, float]:
        """A distribution-free 95% confidence interval of the median: the order statistics of (1-based) ranks
        n/2 - 0.98·sqrt(n) rounded down and 1 + n/2 + 0.98·sqrt(n) rounded up (the normal approximation of the
        binomial), clipped to the sample."""
        v = sorted(self.values)
        n = len(v)
        half = 0.98 * math.sqrt(n)
        lo = min(max(math.floor(n / 2 - half), 1), n)
        hi = max(min(math.ceil(1 + n / 2 + half), n), 1)
        return v[lo - 1], v[hi - 1]

    def relative_ci(self) -> float:
        lo, hi = self.ci95()
        return max(self.median - lo, hi - self.median) / abs(self.median) if self.median else math.inf

    def fmt(self, digits: int = 3, unit: str = "") -> str:
        q1, q3 = self.quartiles
        return f"{self.median:.{digits}f}{unit} [{q1:.{digits}f}-{q3:.{digits}f}]"


class Phases(dict):
    """What a side may return: the seconds of its named phases (e.g. fit and score), timed inside the call.
    The comparison keeps them per round, so each phase gets its own paired ratio."""


@dataclass
class Comparison:
    """The per-round times of every side, and the paired ratios of each side to the reference."""

    times: dict[str, list[float]]
    reference: str
    number: int = 1
    precise: bool = True
    notes: list[str] = field(default_factory=list)
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # side -> phase -> per round
    peak_mb: dict[str, float | None] = field(default_factory=dict)  # side -> peak RSS growth of its warm-up

    def phase_ratio(self, side: str, phase: str, against: str | None = None) -> Spread:
        ref = self.phases[against or self.reference][phase]
        return Spread([a / b for a, b in zip(self.phases[side][phase], ref)])

    @property
    def rounds(self) -> int:
        return len(self.times[self.reference])

    def time(self, side: str) -> Spread:
        return Spread(self.times[side])

    def ratio(self, side: str, against: str | None = None) -> Spread:
        """Paired ratios of ``side`` to ``against`` (default: the reference), one per round."""
        return Spread([a / b for a, b in zip(self.times[side], self.times[against or self.reference])])


def side_by_side(sides: dict[str, Callable[[], object]], reference: str, *, min_rounds: int = 5,
                 max_rounds: int = 41, max_seconds: float = 300.0, rel_ci: float = 0.025, warmup: int = 1,
                 min_time: float = 0.05, sync: Callable[[], None] | None = None,
                 memory: bool = False) -> Comparison:
    """Time every side in interleaved rounds until the median paired ratio is known to ±``rel_ci`` (95%).

    Each round calls every side once (``number`` times when one call is shorter than ``min_time``: the
    per-call time is then the mean of ``number`` calls), in an order rotated each round. ``warmup`` rounds
    first (at least one, which also sets ``number``) are not counted. Stops after ``max_rounds`` rounds or ``max_seconds``, whichever comes first, and
    then marks the comparison imprecise when the interval is still wider. A side that returns
    :class:`Phases` has each phase recorded too. With ``memory``, the first warm-up call of each side is
    wrapped in :func:`peak_rss_growth` (so at least one warm-up round runs).
    """
    sync = sync or (lambda: None)
    names = list(sides)
    peak: dict[str, float | None] = {}
    once = {name: 0.0 for name in names}
    for w in range(max(warmup, 1)):
        for name in names:
            sync()
            t = time.perf_counter()
            if memory and w == 0:
                _, peak[name] = peak_rss_growth(sides[name])
            else:
                sides[name]()
            sync()
            once[name] = time.perf_counter() - t
    # calls per timing: enough that one timing lasts min_time (timer resolution, per-call jitter)
    number = max(1, max(math.ceil(min_time / max(t, 1e-9)) for t in once.values()))
    times: dict[str, list[float]] = {name: [] for name in names}
    phases: dict[str, dict[str, list[float]]] = {}
    start = time.perf_counter()
    precise = False
    for r in range(max(max_rounds, 1)):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t = time.perf_counter()
            for _ in range(number):
                out = sides[name]()
            sync()
            times[name].append((time.perf_counter() - t) / number)
            if isinstance(out, Phases):  # with number > 1, the last call's phases stand for the round
                for phase, seconds in out.items():
                    phases.setdefault(name, {}).setdefault(phase, []).append(seconds)
        if r + 1 >= min_rounds:
            cmp = Comparison(times, reference, number)
            if all(cmp.ratio(n).relative_ci() <= rel_ci for n in names if n != reference):
                precise = True
                break
            if time.perf_counter() - start > max_seconds:
                break
    cmp = Comparison(times, reference, number, precise, phases=phases, peak_mb=peak)
    if not precise:
        worst = max((cmp.ratio(n).relative_ci() for n in names if n != reference), default=0.0)
        cmp.notes.append(f"stopped after {cmp.rounds} rounds with the median ratio known to ±{100 * worst:.1f}% "
                         f"(aim ±{100 * rel_ci:.1f}%): run again on a quieter machine")
    return cmp


def fastest(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> tuple[str, dict[str, float]]:
    """The candidate (a setting of the reference) with the lowest median time, and every candidate's median.

    Each candidate is called once to warm up (worker pools, caches); those over four times slower than the
    fastest warm-up are dropped there (a warm-up's one-time costs are smaller than that), the rest are timed
    in ``rounds`` interleaved rounds, dropping after the first those over twice as slow as the best. A dropped
    candidate's median is that of the times it has."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        t = time.perf_counter()
        candidates[name]()
        times[name].append(time.perf_counter() - t)
    best = min(v[0] for v in times.values())
    names = [n for n in names if times[n][0] <= 4 * best]
    for name in names:
        times[name].clear()  # warm-up times do not count for those that stay
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t)
        if r == 0:
            best = min(times[n][0] for n in names)
            names = [n for n in names if times[n][0] <= 2 * best]
    med = {name: statistics.median(v) for name, v in times.items()}
    return min(names, key=med.get), med


def report(what: str, cmp: Comparison, side: str, *, against: str | None = None, target: str = "") -> None:
    """The ``ratio`` line of ``side`` against ``against`` (default: the reference): the median paired ratio with
    its quartiles and confidence interval, then each side's median time with quartiles, the ratio of each
    phase both sides report, and their peak memory when it was measured."""
    ref = against or cmp.reference
    r = cmp.ratio(side, ref)
    lo, hi = r.ci95()
    fast = max(cmp.time(side).median, cmp.time(ref).median) < 1
    scale, unit, digits = (1e3, " ms", 1) if fast else (1.0, " s", 3)

    def t(name: str) -> str:
        return Spread([v * scale for v in cmp.times[name]]).fmt(digits, unit)

    print(f"ratio {what} = {r.fmt()} (median [quartiles] of {cmp.rounds} paired rounds; 95% CI {lo:.3f}-{hi:.3f})"
          + (f"; target {target}" if target else ""))
    print(f"      {side} {t(side)}, {ref} {t(ref)}" + (f" (each the mean of {cmp.number} calls)" if cmp.number > 1
                                                    else ""))
    for phase in cmp.phases.get(side, {}):
        if phase in cmp.phases.get(ref, {}):
            ours, theirs = Spread(cmp.phases[side][phase]), Spread(cmp.phases[ref][phase])
            print(f"      {phase}: ratio {cmp.phase_ratio(side, phase, ref).fmt()}; {side} {ours.fmt(3, ' s')}, "
                  f"{ref} {theirs.fmt(3, ' s')}")
    if side in cmp.peak_mb and ref in cmp.peak_mb:
        mb = {k: ("unknown" if v is None else f"{v:,.0f} MB") for k, v in cmp.peak_mb.items()}
        print(f"      peak memory (growth of the resident set during its warm-up call): {side} {mb[side]}, "
              f"{ref} {mb[ref]}")
    for note in cmp.notes:
        print(f"      note: {note}")


# --- memory ------------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def peak_rss_growth(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Call ``fn`` and return its result and how far the process's peak resident set rose above its size at
    the call, in MB (Linux: VmHWM after resetting it through /proc/self/clear_refs; None elsewhere). It counts
    every allocation (torch's included, which tracemalloc does not see)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_mb("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, _status_mb("VmHWM") - before
