# Every target creates the virtual environment and installs ppl_em first, so each one
# works on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) models/seed_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ppl_em tests models benchmarks
	$(VENV)/bin/ruff format --check ppl_em tests models benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format ppl_em tests models benchmarks
	$(VENV)/bin/ruff check --fix ppl_em tests models benchmarks

test: lint
	$(PY) -m pytest -ra

clean:
	rm -rf $(VENV) .pytest_cache
