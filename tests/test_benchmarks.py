"""Every benchmark runs at its tiny size and prints its ratios, so none rots; the shared timing helper's
statistics are checked on hand-worked cases."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("[!_]*.py"))
RATIO = re.compile(r"^ratio (.+?) = (\d+\.\d+) \[(\d+\.\d+)-(\d+\.\d+)\]", re.M)


def _timing():
    spec = importlib.util.spec_from_file_location("_timing", BENCH / "_timing.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_timing", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_benchmark_is_smoke_tested():
    assert SCRIPTS == ["calibration.py", "capture.py", "coherence.py", "grokking.py", "influence.py",
                       "influence_moe.py", "pathways.py", "probes.py", "representations.py", "scale.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_tiny_and_prints_its_ratios(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--threads", "1"], cwd=BENCH.parent,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ratios = RATIO.findall(out.stdout)
    assert ratios, out.stdout
    for what, median, q1, q3 in ratios:
        assert 0 < float(q1) <= float(median) <= float(q3), what
    assert "load average" in out.stdout


def test_spread_and_confidence_interval_by_hand():
    t = _timing()
    s = t.Spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s.median == 3.0
    assert s.quartiles == (2.0, 4.0)
    # n = 5: ranks floor(2.5 - 2.19) = 0 -> 1 (clipped) and ceil(1 + 2.5 + 2.19) = 6 -> 5 (clipped)
    assert s.ci95() == (1.0, 5.0)
    assert math.isclose(s.relative_ci(), 2 / 3)
    many = t.Spread([float(v) for v in range(1, 101)])  # ranks floor(50 - 9.8) = 40 and ceil(60.8) = 61
    assert many.ci95() == (40.0, 61.0)


def test_side_by_side_interleaves_and_pairs_rounds(monkeypatch):
    t = _timing()
    calls = []
    clock = {"now": 0.0}

    def side(name, seconds):
        def run():
            calls.append(name)
            clock["now"] += seconds
            return t.Phases(fit=seconds / 2)
        return run

    monkeypatch.setattr(t, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))  # each call takes its seconds
    cmp = t.side_by_side({"ours": side("ours", 1.0), "ref": side("ref", 4.0)}, "ref", min_rounds=3, max_rounds=3)
    assert calls[:2] == ["ours", "ref"]  # the warm-up round
    assert calls[2:] == ["ours", "ref", "ref", "ours", "ours", "ref"]  # the order rotates each round
    assert cmp.rounds == 3 and cmp.precise
    assert cmp.ratio("ours").values == [0.25, 0.25, 0.25]
    assert cmp.phase_ratio("ours", "fit").values == [0.25, 0.25, 0.25]


def test_side_by_side_says_when_the_ratio_is_not_pinned_down(monkeypatch):
    t = _timing()
    clock = {"now": 0.0, "i": 0}

    def noisy():
        clock["i"] += 1
        clock["now"] += 1.0 + (clock["i"] % 3)  # 2, 3, 1, 2, 3, 1 ... seconds: a wide spread

    monkeypatch.setattr(t, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    cmp = t.side_by_side({"ours": noisy, "ref": lambda: clock.__setitem__("now", clock["now"] + 2.0)}, "ref",
                         min_rounds=3, max_rounds=4)
    assert not cmp.precise and "run again" in cmp.notes[0]
