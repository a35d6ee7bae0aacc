# The book's two commands: `make book` (build the HTML book) and `make test` (what CI runs).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adcore-installed
NOTEBOOKS := $(sort $(wildcard book/[0-9][0-9]_*.ipynb))
# OMP_WAIT_POLICY=PASSIVE: on a busy 2-core machine spinning OpenMP threads slow torch 8-12x.
TEST_ENV := ADCORE_FAST=1 ADCORE_PROGRESS=0 MPLBACKEND=Agg PYTHONHASHSEED=0 OMP_WAIT_POLICY=PASSIVE

.PHONY: help venv book test unit notebooks book-check browser-check lint lab repro clean

help:
	@echo "make book   - install into $(VENV) if needed, execute the chapters (cached) and build _build/html"
	@echo "make test   - unit tests, chapters under nbval (fast mode), strict book build, browser check"
	@echo "make lab    - open the chapters in JupyterLab"
	@echo "make repro  - run the papers' tables for the data that is present (slow; GPU advised)"
	@echo "make clean  - remove _build (never .venv, data or results)"

# The tested, pinned set: requirements/lock.txt; the package itself goes in editable, without deps.
$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --builder html
	@echo "The book: $(CURDIR)/_build/html/index.html"

lint: $(STAMP)
	$(PY) -m ruff check adcore tests benchmarks

unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -m "not browser" -p no:cacheprovider

notebooks: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
		--nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)

# MathJax from the npm registry, so that the offline browser check sees rendered equations
# (the published book loads it from a CDN). Optional: without npm the check still runs.
MATHJAX := _build/mathjax/package/es5/tex-mml-chtml.js
$(MATHJAX):
	@mkdir -p _build/mathjax
	-cd _build/mathjax && npm pack --silent mathjax@3.2.2 >/dev/null && tar xzf mathjax-3.2.2.tgz

# The strict build renders the committed (standard-mode) outputs; execution is `make book`'s job.
book-check: $(STAMP) $(MATHJAX)
	$(PY) tests/nbtools.py check-config _config.yml _build/_config_check.yml $(MATHJAX)
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going --config _build/_config_check.yml

browser-check: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests/test_rendered_book.py -m browser -p no:cacheprovider

test: lint unit notebooks book-check browser-check
	@echo "make test: all checks passed"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

repro: $(STAMP)
	$(PY) -m adcore tables vqvae --results-dir book/results
	$(PY) -m adcore tables cflow --results-dir book/results

clean:
	rm -rf _build
