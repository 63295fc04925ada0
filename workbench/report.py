"""Reports: self-contained HTML files that stay interactive offline.

Two kinds:
- :func:`run_report` builds a report of a run straight from its store: plotly figures with their own
  sliders and frames, plotly.js inlined once. Each registered measurement contributes its section
  (:meth:`workbench.Measurement.section`), in the order of the registry.
- :func:`render_notebook` executes a notebook and converts it to one light HTML file: figures kept as plotly
  JSON and drawn by plotly.js inlined once, no widget state (a view needs a live kernel; its output becomes a
  one-line note, progress bars are dropped), and nothing loaded from the network (no require.js, MathJax or
  widget manager from a CDN).
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from workbench.errors import DependencyError, InputError
from workbench.figures import Section
from workbench.measure import registry
from workbench.runs import Run
from workbench.store import Store

#: The kernel's plotly renderer while a report executes: figures come back as JSON, drawn once by the report.
PLOTLY_RENDERER_FOR_REPORTS = "plotly_mimetype"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: The lab template without what it would fetch from a CDN: require.js (plotly's figures here need none),
#: MathJax (the notebooks hold no math) and the widget manager (widget state is dropped); plotly.js goes in once.
_REPORT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js -%}
{{ super() }}
<script type="text/javascript">{{ resources.plotly_js }}</script>
{%- endblock html_head_js -%}
"""


def build_sections(store: Store, run: Run | None = None, sections: Sequence[str] | None = None) -> list[Section]:
    """The sections of the measurements in ``sections`` (registered names; default: every registered one, in
    report order) that have something to show."""
    known = registry()
    names = list(known) if sections is None else list(sections)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown measurement(s) {unknown}; known: {', '.join(known)}")
    out = []
    for name in names:
        sec = known[name].section(store, run)
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


def run_report(run: Run, path: str | os.PathLike | None = None, sections: Sequence[str] | None = None) -> Path:
    """The report of a run's store, at ``path`` (default: ``report.html`` in the run's folder); ``sections``:
    the measurements to show (default: all that were measured)."""
    store = run.store
    secs = build_sections(store, run, sections)
    if not secs:
        raise InputError(f"the store of run {run.name!r} is empty; measure the run first (workbench measure)")
    path = Path(path) if path is not None else run.root / "report.html"
    intro = (
        f"Run {run.name}: {len(run)} checkpoints, steps {run.steps[0]} to {run.steps[-1]}. "
        "Figures with a slider show the checkpoint it is set to; the others say in their title that they span "
        "all checkpoints. The file works offline."
    )
    return write_html(path, f"Generalization workbench: {run.name}", secs, intro)


def _light_outputs(nb) -> int:
    """Turn the executed notebook's outputs into what a light offline report needs, in place: plotly JSON into
    a div and a ``Plotly.newPlot`` call (plotly.js itself comes once, in the page head), and a widget view into a
    note saying it needs a live kernel. Returns the number of figures."""
    n_figures, drop = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            if PLOTLY_MIME in data:
                fig = data[PLOTLY_MIME]
                div = pio.to_html(fig, include_plotlyjs=False, full_html=False, auto_play=False,
                                  config=fig.get("config"), validate=False)
                out["data"] = {"text/html": div}
                n_figures += 1
            elif WIDGET_MIME in data:
                # A view's text form is its class's repr, "PathwayView(children=..."; a progress bar's is its
                # text at display time ("  0%| ..."), stale by the end: dropped.
                name = re.match(r"(\w+)\(", str(data.get("text/plain", "")))
                if name is None:
                    drop.append((cell, out))
                    continue
                out["data"] = {"text/html": f"<p><i>{html.escape(name[1])}: an interactive view, shown in "
                                            "JupyterLab with a live kernel (<code>make lab</code>); the figures "
                                            "above are the same, with their own sliders.</i></p>"}
    for cell, out in drop:
        cell.outputs.remove(out)
    nb.metadata.pop("widgets", None)  # the widget state: megabytes that no report shows
    return n_figures


def render_notebook(
    notebook: str | os.PathLike, out: str | os.PathLike | None = None, execute: bool = True, timeout: int = 1800
) -> Path:
    """Execute a notebook (in its own folder) and write it as one light, offline HTML file (see the module's
    description)."""
    try:  # the jupyter extra: optional, and seconds to import
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
        os.environ["PLOTLY_RENDERER"] = PLOTLY_RENDERER_FOR_REPORTS  # the kernel inherits it
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=False,
                           resources={"metadata": {"path": str(nb_path.parent)}}).execute()
        finally:
            if old is None:
                os.environ.pop("PLOTLY_RENDERER", None)
            else:
                os.environ["PLOTLY_RENDERER"] = old
    _light_outputs(nb)
    with tempfile.TemporaryDirectory() as templates:  # the template extends nbconvert's lab template
        (Path(templates) / "workbench_report.html.j2").write_text(_REPORT_TEMPLATE, encoding="utf-8")
        exporter = HTMLExporter(extra_template_paths=[templates], template_file="workbench_report.html.j2",
                                exclude_input_prompt=True, exclude_output_prompt=True)
        body, _ = exporter.from_notebook_node(nb, resources={"plotly_js": get_plotlyjs()})
    out = Path(out) if out is not None else nb_path.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, out)
    return out
