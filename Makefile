# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench report clean-runs

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

demo: $(STAMP)
	$(VENV)/bin/workbench demo

test: $(STAMP)
	WORKBENCH_HOME=$(CURDIR)/.workbench-test WORKBENCH_QUICK=1 $(PY) -m pytest

test-fast: $(STAMP)
	WORKBENCH_HOME=$(CURDIR)/.workbench-test WORKBENCH_QUICK=1 $(PY) -m pytest -m "not slow" tests

bench: $(STAMP)
	# benchmarks/_*.py are their shared helpers, not benchmarks
	for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

report: $(STAMP)
	$(VENV)/bin/workbench report notebooks --out reports

clean-runs:
	rm -rf .workbench-test
