# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
# `make lab` adds JupyterLab and starts it on notebooks/; `make numbers` regenerates the README's numbers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.lab-installed
# JupyterLab refuses to start as root unless told to.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=
LAB_DIR ?= notebooks

.PHONY: demo test test-fast bench report numbers lab browser clean-runs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a CPU wheel here; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# kronfluence (the influence reference) declares torchvision, which breaks transformers beside the CPU
	# torch: install it without its declared dependencies (the real ones are in the 'reference' extra).
	$(PIP) install --no-deps kronfluence==1.0.1
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is not None)" || \
		$(PIP) uninstall -y torchvision
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

$(LAB_STAMP): $(STAMP)
	$(PIP) install -e '.[lab]'
	touch $(LAB_STAMP)

demo: $(STAMP)
	$(VENV)/bin/workbench demo

lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=$(LAB_DIR) $(ROOT_FLAG) $(LAB_ARGS)

# The browser test (tests/test_browser.py) drives Debian's Chromium headless: install it where it is missing and
# apt-get can (root); elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) browser
	WORKBENCH_HOME=$(CURDIR)/.workbench-test WORKBENCH_QUICK=1 $(PY) -m pytest

test-fast: $(STAMP)
	WORKBENCH_HOME=$(CURDIR)/.workbench-test WORKBENCH_QUICK=1 $(PY) -m pytest -m "not slow" tests

bench: $(STAMP)
	# benchmarks/_*.py are their shared helpers, not benchmarks
	for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

report: $(STAMP)
	$(VENV)/bin/workbench report notebooks --out reports

# Every number the README quotes about the built-in run, rewritten from the run's store (trained and measured
# first if needed); the tests check the README against the run they train.
numbers: $(STAMP)
	$(VENV)/bin/workbench numbers --write README.md

clean-runs:
	rm -rf .workbench-test
