"""The `workbench` command: demo, measure, report, and errors as one clear line."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def workbench(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env)


def check_self_contained(html: str) -> None:
    # plotly.js inlined exactly once, nothing fetched from the network
    assert len(re.findall(r"plotly\.js v\d", html)) == 1
    assert not re.search(r"<script[^>]+src=[\"']https?:", html)
    assert "sliders" in html and "frames" in html


@pytest.mark.slow
def test_demo_quick_writes_a_self_contained_report(tmp_path, quick_run):
    out = tmp_path / "report.html"
    res = workbench("demo", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"report: {out.resolve()}"
    html = out.read_text()
    check_self_contained(html)
    for title in ("Training and test accuracy", "Routing statistics", "Influence of training documents",
                  "lean on training documents with the same answer"):
        assert title in html
    # a second demo reuses the run and the store: nothing is trained or measured again
    parts = sorted(p.stat().st_mtime_ns for p in (quick_run.root / "store").rglob("step_*.parquet"))
    res = workbench("demo", "--quick", "--out", str(out))
    assert res.returncode == 0
    assert sorted(p.stat().st_mtime_ns for p in (quick_run.root / "store").rglob("step_*.parquet")) == parts
    assert "training" not in res.stderr


def test_measure_and_report_on_a_run_folder(tiny_run, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(tiny_run.root, folder, ignore=shutil.ignore_patterns("store", "report.html"))
    res = workbench("measure", str(folder), "--probe", "basic")
    assert res.returncode == 0, res.stderr
    assert (folder / "store" / "basic").is_dir()
    res = workbench("report", str(folder))
    assert res.returncode == 0, res.stderr
    check_self_contained((folder / "report.html").read_text())


def test_errors_are_one_clear_line(tmp_path):
    res = workbench("measure", str(tmp_path))
    assert res.returncode == 2
    assert res.stderr.startswith("workbench: NoCheckpointsError: no checkpoints in")
    assert "Traceback" not in res.stderr
    res = workbench("measure", str(tmp_path), "--probe", "nonsense")
    assert res.returncode == 2
