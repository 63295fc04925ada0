"""Reports: self-contained HTML files that stay interactive offline.

Two kinds:
- :func:`run_report` builds a report of a run straight from its store: plotly figures with their own
  sliders and frames, plotly.js inlined once. Each probe family contributes a section through
  :data:`SECTIONS` (dotted paths, imported on use, so a family that is not measured costs nothing).
- :func:`render_notebook` executes a notebook and converts it to HTML with plotly figures embedded
  (ipywidgets are left out of reports: their embedded state renders only where a CDN can be reached).
"""

from __future__ import annotations

import html
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from workbench.errors import DependencyError, InputError
from workbench.store import Store

PLOTLY_RENDERER_FOR_REPORTS = "notebook"


@dataclass
class Section:
    """A titled part of a report: text paragraphs and figures, in order."""

    title: str
    items: list = field(default_factory=list)  # str (a paragraph of plain text) or go.Figure

    def add(self, item) -> "Section":
        self.items.append(item)
        return self


#: Section builders ``f(store, run) -> Section | None``, as "module:function"; None means "nothing to show".
SECTIONS: list[str] = [
    "workbench.probes.basic.figures:training_section",
    "workbench.probes.routing.figures:routing_section",
    "workbench.probes.pathways.figures:report_section",
    "workbench.probes.calibration.figures:report_section",
    "workbench.probes.linear.figures:report_section",
    "workbench.probes.influence.figures:report_section",
]


def _load(dotted: str) -> Callable:
    mod, _, fn = dotted.partition(":")
    return getattr(importlib.import_module(mod), fn)


def build_sections(store: Store, run=None, sections: Sequence[str] | None = None) -> list[Section]:
    out = []
    for dotted in sections or SECTIONS:
        sec = _load(dotted)(store, run)
        if sec is not None:
            out.append(sec)
    return out


def write_html(path: str | os.PathLike, title: str, sections: Sequence[Section], intro: str = "") -> Path:
    """A single HTML file with plotly.js inlined once; written atomically."""

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}"
        "p{line-height:1.45}.fig{margin:1em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    first = True
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        for item in sec.items:
            if isinstance(item, go.Figure):
                parts.append("<div class='fig'>" + item.to_html(full_html=False, include_plotlyjs=first, auto_play=False) + "</div>")
                first = False
            elif item:
                parts.append(f"<p>{html.escape(str(item))}</p>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_report(run, path: str | os.PathLike | None = None, sections: Sequence[str] | None = None) -> Path:
    """The report of a run's store, at ``path`` (default: ``report.html`` in the run's folder)."""
    store = run.store
    secs = build_sections(store, run, sections)
    if not secs:
        raise InputError(f"the store of run {run.name!r} is empty; measure the run first (workbench measure)")
    path = Path(path) if path is not None else run.root / "report.html"
    intro = (
        f"Run {run.name}: {len(run)} checkpoints, steps {run.steps[0]} to {run.steps[-1]}. "
        "Every figure with a slider shows one checkpoint at a time; the file works offline."
    )
    return write_html(path, f"Generalization workbench: {run.name}", secs, intro)


def render_notebook(
    notebook: str | os.PathLike, out: str | os.PathLike | None = None, execute: bool = True, timeout: int = 1800
) -> Path:
    """Execute a notebook (in its own folder) and write it as HTML with plotly figures embedded."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbconvert import HTMLExporter
    except ImportError as exc:
        raise DependencyError(
            "rendering notebooks needs the jupyter extra: pip install 'generalization-workbench[jupyter]'"
        ) from exc
    nb_path = Path(notebook)
    if not nb_path.exists():
        raise InputError(f"no notebook at {nb_path}")
    nb = nbformat.read(nb_path, as_version=4)
    if execute:
        old = os.environ.get("PLOTLY_RENDERER")
        os.environ["PLOTLY_RENDERER"] = PLOTLY_RENDERER_FOR_REPORTS  # the kernel inherits it: figures embed
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(nb_path.parent)}}).execute()
        finally:
            if old is None:
                os.environ.pop("PLOTLY_RENDERER", None)
            else:
                os.environ["PLOTLY_RENDERER"] = old
    body, _ = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    out = Path(out) if out is not None else nb_path.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    return out
