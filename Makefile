# Two entry points (see README): `make quickstart` and `make test`. Both create or update .venv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reprozoo-installed

.PHONY: install quickstart test benchmark-engression

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	REPROZOO_OFFLINE=1 $(PY) cli.py fit --config configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

benchmark-engression: $(STAMP)
	$(PY) benchmarks/engression_fig4.py
