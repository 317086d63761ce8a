# actstore developer entry points. Every target creates .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
# CPU-friendly default: 2.13.0 resolves to a small CPU wheel; override e.g. TORCH_SPEC='torch>=2.14' for CUDA.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv install install-dev demo test test-all test-conformance lint bench bench-quick clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# constraints.txt pins every other package to the versions the suite passed with, so pip resolves at once
# instead of backtracking through old releases. torch is named in the same pip call as the package so the resolver never wanders to other (CUDA) builds.
$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" -c constraints.txt -e ".[demo,s3,tools]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" -c constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/actstore demo --out demo-output

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

test-all: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "not gpu"

# Executor conformance: local vs Ray x dtype x packing x plain/append x file/S3, every store byte-identical to the
# local reference. `make test` runs a covering subset; CI adds the slow rest (CONFORMANCE_MARKS='slow and not gpu').
CONFORMANCE_MARKS ?= not gpu
test-conformance: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "$(CONFORMANCE_MARKS)" tests/extract/test_conformance.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check actstore schemas pipeline workers tests benchmarks
	$(VENV)/bin/mypy

bench-quick: $(VENV)/.installed-dev
	$(PY) benchmarks/run.py --quick

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) demo-output build *.egg-info
