# Every target creates the virtual environment and installs ppl_em first, so each one
# works on a fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) models/seed_demo.py
	@# EM against find_MAP and NUTS, with an HTML report per seed model (modest draws).
	$(VENV)/bin/ppl-em compare coin --out reports/coin --draws 300 --tune 300 --chains 2 --force
	$(VENV)/bin/ppl-em compare exponential --out reports/exponential --draws 300 --tune 300 --chains 2 --force
	@echo "Reports: reports/coin/index.html reports/exponential/index.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check ppl_em tests models benchmarks
	$(VENV)/bin/ruff format --check ppl_em tests models benchmarks
	@# the package's layers and no import cycles (contracts in pyproject.toml)
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format ppl_em tests models benchmarks
	$(VENV)/bin/ruff check --fix ppl_em tests models benchmarks

# Two processes, each taking whole test files (module fixtures such as the Dask cluster
# and the cross-check fits are built once). ArviZ writes a once-a-day stamp at import
# through a fixed temporary file name, and two workers importing it at once on a fresh
# machine raced on it (FileNotFoundError at collection): one import first writes it.
ARVIZ_STAMP = $(PY) -W ignore -c "import arviz"

test: lint
	$(ARVIZ_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -ra --durations=15

test-slow: $(STAMP)
	$(ARVIZ_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -ra -m slow --durations=15

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache
