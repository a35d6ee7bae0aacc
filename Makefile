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
# MathJax from the npm registry, for every local build: equations are typeset offline.
MATHJAX_DIR := _build/mathjax
MATHJAX := $(MATHJAX_DIR)/package/es5/tex-mml-chtml.js

.PHONY: help venv book publish test unit notebooks book-check browser-check chromium lint lab \
	repro clean install-cells

help:
	@echo "make book     - install into $(VENV) if needed, execute the chapters (cached) and build _build/html"
	@echo "make test     - unit tests, chapters under nbval (fast mode), strict book build, browser check"
	@echo "make lab      - open the chapters in JupyterLab"
	@echo "make repro    - run the papers' tables for the data that is present (slow; GPU advised)"
	@echo "make publish  - the book for a web server: like 'make book', MathJax from its CDN"
	@echo "make clean    - remove _build (never .venv, data or results)"

# The tested, pinned set: requirements/lock.txt; the package itself goes in editable, without deps.
# setuptools >= 77 reads the licence as an SPDX string (pyproject.toml).
$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2" "setuptools>=77"
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

$(MATHJAX): | $(STAMP)
	$(PY) tests/nbtools.py mathjax $(MATHJAX_DIR)

# The configuration is written each time: the local MathJax when present (else the CDN).
book: $(STAMP) $(MATHJAX)
	$(PY) tests/nbtools.py book-config _config.yml _build/_config_book.yml $(MATHJAX_DIR)
	$(VENV)/bin/jupyter-book build . --builder html --config _build/_config_book.yml
	@echo "The book: $(CURDIR)/_build/html/index.html"

# For a web server: the published pages load MathJax from the CDN (_config.yml as it is).
publish: $(STAMP)
	$(VENV)/bin/jupyter-book build . --builder html
	@echo "The book to publish: $(CURDIR)/_build/html"

lint: $(STAMP)
	$(PY) -m ruff check adcore tests benchmarks

unit: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -m "not browser" -p no:cacheprovider

notebooks: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
		--nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)

# The strict build renders the committed (standard-mode) outputs; execution is `make book`'s job.
book-check: $(STAMP) $(MATHJAX)
	$(PY) tests/nbtools.py book-config _config.yml _build/_config_check.yml $(MATHJAX_DIR) --no-execute
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going --config _build/_config_check.yml

# Debian's Chromium for the rendered-book check, installed when missing (sudo when not root).
chromium:
	@if [ -z "$${ADCORE_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
	    && ! command -v chromium-browser >/dev/null 2>&1; then \
	  echo "installing Debian's chromium (for the rendered-book check)"; \
	  SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

browser-check: $(STAMP) chromium
	$(TEST_ENV) $(PY) -m pytest tests/test_rendered_book.py -m browser -p no:cacheprovider

test: lint unit notebooks book-check browser-check
	@echo "make test: all checks passed"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

# Result files go where the chapters read them: adcore.repro.results_dir() (adcore/results).
repro: $(STAMP)
	$(PY) -m adcore tables vqvae
	$(PY) -m adcore tables cflow

# After changing repository.url in _config.yml: rewrite every chapter's install cell.
install-cells: $(STAMP)
	$(PY) tests/nbtools.py install-cell $(NOTEBOOKS)

clean:
	rm -rf _build
