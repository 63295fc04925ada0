"""Packaging: the core imports without Jupyter, the two dependency lists agree, the console script exists."""

import re
import subprocess
import sys
import tomllib

from tests.conftest import REPO


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        reqs += [r for r in items if not r.startswith("generalization-workbench")]
    py = {_name(r): r.replace(" ", "") for r in reqs}
    lines = (REPO / "environment.yml").read_text().splitlines()
    pip_block = lines[next(i for i, line in enumerate(lines) if line.strip() == "- pip:") + 1:]
    env_lines = [line.strip()[2:] for line in pip_block if line.strip().startswith("- ") and "-e " not in line]
    env = {_name(r): r.replace(" ", "") for r in env_lines}
    assert set(env) == set(py), f"only in environment.yml: {set(env) - set(py)}; only in pyproject: {set(py) - set(env)}"
    for name, spec in py.items():
        if name == "torch":  # pyproject checks a range; environment.yml pins the CPU wheel the Makefile installs
            assert env[name] == "torch==2.13.0"
        else:
            assert env[name] == spec, name


def test_torchvision_is_kept_out():
    text = (REPO / "pyproject.toml").read_text() + (REPO / "environment.yml").read_text()
    assert not re.search(r"^\s*-?\s*\"?torchvision", text, re.M)


BLOCK_JUPYTER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('ipywidgets', 'IPython', 'widgets', 'anywidget', 'ipykernel', 'nbformat', 'nbconvert'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import workbench, workbench.cli, workbench.report, workbench.figures, workbench.toys
{extra}
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'IPython', 'widgets')))
"""


def test_workbench_imports_without_jupyter():
    import importlib
    import pkgutil

    import workbench

    extra = "\n".join(
        f"import {m.name}" for m in pkgutil.walk_packages(workbench.__path__, "workbench.")
    )
    out = subprocess.run([sys.executable, "-c", BLOCK_JUPYTER.format(extra=extra)], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"
    assert importlib.import_module("widgets").CheckpointExplorer


def test_console_script_is_declared_and_runs():
    assert _pyproject()["project"]["scripts"]["workbench"] == "workbench.cli:main"
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "demo" in out.stdout and "measure" in out.stdout


def test_make_lab_installs_the_lab_extra_and_starts_jupyterlab():
    """`make lab`: the lab extra (JupyterLab) in pyproject and environment.yml, then JupyterLab on notebooks/,
    with --allow-root exactly when run as root (JupyterLab refuses root otherwise)."""
    import os
    import shutil

    lab = _pyproject()["project"]["optional-dependencies"]["lab"]
    assert any(_name(r) == "jupyterlab" for r in lab)
    if shutil.which("make") is None:
        return
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", "lab"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "install -e '.[lab]'" in out.stdout
    start = [line for line in out.stdout.splitlines() if "jupyter lab" in line]
    assert start and "--notebook-dir=notebooks" in start[0]
    assert ("--allow-root" in start[0]) == (os.getuid() == 0)
