"""The README's "Writing a probe" example, run as written: a new family is one folder plus one widget module,
and the CLI, the report and the views find it through the registry."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import sys
    import workbench.probes, widgets

    # the example's two files live in a temporary tree beside the package: the registry finds the folder
    workbench.probes.__path__.append(sys.argv[1] + "/workbench/probes")
    widgets.__path__.append(sys.argv[1] + "/widgets")
    from workbench.cli import main
    from workbench.measure import demo_measurements, registry

    run = sys.argv[2]
    assert "spread" in registry() and "spread" not in demo_measurements()
    assert main(["measure", run, "--probe", "spread", "--probe", "basic", "--option", "quantile=0.5"]) == 0
    assert main(["report", run]) == 0
    from widgets import SpreadView
    view = widgets.view(run, "spread")
    assert isinstance(view, SpreadView)
    view.set_step(view.steps[0])
    print("ok", view.figures["spread"].layout.shapes[0].x0)
    """
)


def _example_files() -> dict[str, str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a probe", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    files = {b.splitlines()[0][2:].strip(): b for b in blocks if b.startswith("# ")}
    assert set(files) == {"workbench/probes/spread/__init__.py", "widgets/spread.py"}
    return files


@pytest.mark.slow
def test_writing_a_probe_example_is_one_folder_and_one_widget_module(tiny_run, tmp_path):
    for rel, code in _example_files().items():
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_text(code)
    run = tmp_path / "run"
    shutil.copytree(tiny_run.root, run, ignore=shutil.ignore_patterns("store", "report.html"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tree"), str(run)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].split() == ["ok", str(tiny_run.steps[0])]
    # the stored numbers are the quantile of the per-sample losses the basic measurement stored
    spread = pl.read_parquet(sorted((run / "store" / "spread").glob("step_*.parquet"))[-1])
    basic = pl.read_parquet(sorted((run / "store" / "basic").glob("step_*.parquet"))[-1])
    for group in ("train", "test"):
        losses = basic.filter((pl.col("metric") == "loss") & (pl.col("group") == group)).drop_nulls("sample_id")
        got = spread.filter(pl.col("group") == group)["value"].item()
        assert got == pytest.approx(float(np.quantile(losses["value"].to_numpy(), 0.5)), rel=1e-5)
    assert "Loss spread" in (run / "report.html").read_text()
    assert "0.5" in (run / "store" / "spread" / "options.json").read_text()
