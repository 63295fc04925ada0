"""The package's layers point one way: checkpoints → capture → probe families → store → views.

Read from the source (the AST of every module), not by importing it: an import cycle or an upward import
fails here with the modules named, before it can hide inside a function.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from tests.conftest import REPO

#: Low to high; a module may import its own layer and those below. The probe families share one layer but
#: do not import each other.
LAYERS = [
    ["workbench.errors", "workbench.checks"],
    ["workbench.samples", "workbench.store", "workbench.lock", "workbench.stats", "workbench.distributed",
     "workbench.spill"],
    ["workbench.models"],
    ["workbench.runs"],
    ["workbench.capture", "workbench.gradients"],
    ["workbench.figures"],
    ["workbench.measure", "workbench.sharding"],
    ["workbench.probes"],
    ["workbench.report"],
    ["workbench.toys"],
    ["workbench.cli", "workbench.__main__"],
    ["workbench"],  # the package's own __init__: the public names, from anywhere below
]
JUPYTER = ("widgets", "ipywidgets", "IPython", "anywidget", "ipykernel")
#: Third-party modules slow enough to import that a function may import them when it needs them.
HEAVY = ("transformers", "scipy", "nbformat", "nbclient", "nbconvert", "umap", "duckdb", "accelerate")


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules("workbench")


def _resolve(name: str) -> str:
    """The module an import names (``from workbench.x import y`` names workbench.x.y when y is a module)."""
    return name if name in MODULES else name.rpartition(".")[0]


@functools.cache
def _imports(path: Path) -> list[tuple[str, int, bool, list[str]]]:
    """(imported module, line, inside a function, names) for every import statement of a file."""
    return list(_read_imports(path))


def _read_imports(path: Path):
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, id(node) in inside, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield (_resolve(full) if node.module.startswith("workbench") else node.module), node.lineno, \
                    id(node) in inside, [a.name]


def _layer(module: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _family(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "probes" else None


def test_imports_point_down_and_families_stand_alone():
    wrong = []
    for mod, path in MODULES.items():
        for target, line, _, _ in _imports(path):
            if not target.startswith("workbench") or mod == "workbench":
                continue
            if target == "workbench" or _layer(target) > _layer(mod):
                wrong.append(f"{mod}:{line} imports {target} (a layer above)")
            elif _family(mod) and _family(target) and _family(mod) != _family(target):
                wrong.append(f"{mod}:{line} imports {target} (another probe family)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, _, inside, _ in _imports(p) if t in MODULES and t != m and not inside}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_workbench_never_imports_jupyter_and_imports_in_functions_only_heavy_modules():
    wrong = []
    for mod, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, inside, _ in _imports(path):
            if target.split(".")[0] in JUPYTER:
                wrong.append(f"{mod}:{line} imports {target}: workbench never imports widgets or Jupyter")
            if not inside or mod == "workbench.cli":  # the CLI imports the package when a command runs
                continue
            commented = _commented(lines, line)
            if target.split(".")[0] not in HEAVY:
                wrong.append(f"{mod}:{line} imports {target} inside a function; import it at the top")
            elif not commented:
                wrong.append(f"{mod}:{line} imports {target} inside a function without a comment saying why")
    assert not wrong, "\n".join(wrong)


def _commented(lines: list[str], line: int) -> bool:
    """Whether the import at ``line`` (1-based), or the block of imports it is in, has a comment on it or on
    the line just above the block."""
    i = line - 1
    while i > 0 and lines[i - 1].strip().startswith(("import ", "from ", "try:")) and "#" not in lines[i]:
        i -= 1
    return any("#" in lines[j] for j in (i - 1, i, line - 1) if j >= 0)


@pytest.mark.parametrize("package", ["workbench", "widgets"])
def test_no_private_names_across_modules(package):
    wrong = []
    for mod, path in _modules(package).items():
        for target, line, _, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if target.split(".")[0] in ("workbench", "widgets") and private:
                wrong.append(f"{mod}:{line} imports private {private} from {target}")
    assert not wrong, "\n".join(wrong)
