"""The reports as a person sees them: opened in headless Chromium (Debian's package, driven by playwright) with
the network cut off. The quick run's demo report must load without console errors or network requests, draw
every figure, and every slider must change its figure's data; a notebook report must be light (no widget
state) and offline too.

`make test` installs Chromium where it is missing and apt-get can; elsewhere these tests skip and say why.
Set WORKBENCH_SCREENSHOTS to a folder to keep screenshots of what the browser showed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# URLs a self-contained page may load: itself and what it builds in memory.
LOCAL = re.compile(r"^(file|data|blob|about):")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `make test` installs Debian's chromium where apt-get can "
                    "(as root); elsewhere install it (apt-get install chromium) to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as on the build machines
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A page opened offline: every request that is not the file itself is refused and recorded, and so is
    every console error and uncaught exception."""

    def __init__(self, browser, path: Path):
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.route("**/*", self._route)
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def _route(self, route):
        url = route.request.url
        if LOCAL.match(url):
            route.continue_()
        else:
            self.requests.append(url)
            route.abort()

    def figures(self) -> int:
        """Wait until plotly has drawn every figure div; return how many there are."""
        self.page.wait_for_function(
            "() => { const d = [...document.querySelectorAll('div.plotly-graph-div')];"
            " return d.length > 0 && d.every(x => x._fullLayout && x.querySelector('svg.main-svg')); }",
            timeout=60_000)
        return self.page.evaluate("document.querySelectorAll('div.plotly-graph-div').length")

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("WORKBENCH_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


# What a figure shows, as plain data: every trace's x, y, z and text, and the title.
FIGURE_DATA = """(i) => { const d = document.querySelectorAll('div.plotly-graph-div')[i];
  return JSON.stringify([d.data.map(t => [t.x, t.y, t.z, t.text]), d.layout.title && d.layout.title.text]); }"""


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """The quick run's demo report (the run is trained and measured once, and shared with the other tests)."""
    from workbench.cli import measured_demo_run
    from workbench.report import run_report

    run = measured_demo_run(quick=True)
    return run, run_report(run, tmp_path_factory.mktemp("report") / "report.html")


def test_demo_report_draws_every_figure_offline_and_every_slider_moves_its_data(browser, demo_report):
    run, path = demo_report
    html = path.read_text(encoding="utf-8")
    n_divs = len(re.findall(r'<div id="[^"]+" class="plotly-graph-div"', html))
    page = Page(browser, path)
    assert page.figures() == n_divs >= 12
    assert page.requests == [], f"the report asked the network for {page.requests}"
    sliders = page.page.evaluate("[...document.querySelectorAll('div.plotly-graph-div')]"
                                 ".map((d, i) => (d.layout.sliders || []).length ? i : -1).filter(i => i >= 0)")
    assert len(sliders) >= 8, "most figures of the report follow the checkpoint slider"
    for i in sliders:
        before = page.page.evaluate(FIGURE_DATA, i)
        label = page.page.evaluate(f"document.querySelectorAll('div.plotly-graph-div')[{i}]"
                                   ".querySelector('.slider-group text.slider-label').textContent")
        # Move the slider as a person would: click the left end of its rail (the first checkpoint).
        rail = page.page.locator("div.plotly-graph-div").nth(i).locator("rect.slider-rail-rect")
        rail.scroll_into_view_if_needed()
        box = rail.bounding_box()
        page.page.mouse.click(box["x"] + 2, box["y"] + box["height"] / 2)
        page.page.wait_for_timeout(150)
        after = page.page.evaluate(FIGURE_DATA, i)
        moved = page.page.evaluate(f"document.querySelectorAll('div.plotly-graph-div')[{i}]"
                                   ".querySelector('.slider-group text.slider-label').textContent")
        assert moved != label, f"figure {i}: the slider did not move ({label})"
        assert after != before, f"figure {i}: moving the slider from {label} to {moved} changed nothing it shows"
    # a figure without a slider says that it spans all checkpoints
    titles = page.page.evaluate("[...document.querySelectorAll('div.plotly-graph-div')]"
                                ".filter(d => !(d.layout.sliders || []).length)"
                                ".map(d => d.layout.title && d.layout.title.text || '')")
    assert titles and all("all checkpoints" in t for t in titles), titles
    page.screenshot("demo-report")
    assert page.errors == [], page.errors


@pytest.fixture(scope="module")
def notebook_report(tmp_path_factory, demo_report):
    """notebooks/00_overview.ipynb rendered as `make report` renders it (quick settings, as the tests run it)."""
    from tests.conftest import REPO
    from workbench.report import render_notebook

    return render_notebook(REPO / "notebooks" / "00_overview.ipynb",
                           tmp_path_factory.mktemp("reports") / "00_overview.html")


def test_notebook_report_is_light_offline_and_keeps_its_figures(browser, notebook_report):
    import nbformat

    from tests.conftest import REPO

    html = notebook_report.read_text(encoding="utf-8")
    size = notebook_report.stat().st_size
    assert size < 8e6, f"{size / 1e6:.1f} MB"
    assert len(re.findall(r"plotly\.js v\d", html)) == 1  # plotly.js inlined once
    assert "application/vnd.jupyter.widget-state+json" not in html  # no widget state
    assert not re.search(r"<script[^>]+src=[\"']?https?:", html)
    # the one view (CheckpointExplorer) says where it lives; no other widget (such as the progress bars
    # transformers would show while loading the OLMoE checkpoints) is left
    assert html.count("an interactive view, shown in JupyterLab") == 1 and "CheckpointExplorer: an interactive" in html
    nb = nbformat.read(REPO / "notebooks" / "00_overview.ipynb", as_version=4)
    shown = sum(c.source.count(".show()") for c in nb.cells if c.cell_type == "code")
    page = Page(browser, notebook_report)
    assert page.figures() == shown  # every figure the notebook shows, drawn
    assert page.requests == [], f"the report asked the network for {page.requests}"
    page.screenshot("notebook-report")
    assert page.errors == [], page.errors
