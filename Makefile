# The two commands a user needs: `make repro` (the whole pipeline) and `make test` (the suite, what CI runs).
# `make test-fast`: the unit tests alone, for the edit-test loop. `make golden`: rewrite the golden record.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Stage commands in dvc.yaml call `python`: put the project's environment first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: repro test test-fast golden venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

# Two pytest-xdist workers: the end-to-end tests spend much of their time starting Python and DVC on one core, which
# the second worker overlaps (docs/reproducibility.md: the times).
test: $(STAMP)
	pytest -n 2

test-fast: $(STAMP)
	pytest -m "not e2e and not slow"

# Rewrite tests/golden/ after a change meant to change results (tests/test_golden.py says when).
golden: $(STAMP)
	python tests/test_golden.py
