# Two entry points (see README): `make quickstart` and `make test`. Both create or update .venv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reprozoo-installed

.PHONY: install quickstart test test-slow test-all lint format benchmark-engression

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# frost's texture photographs for the tests: imagecorruptions' package data (Apache-2.0, the same files as
	# hendrycks/robustness), without its dependencies (full opencv-python, which must not sit beside the headless one)
	$(PY) -m pip install --quiet --no-deps "imagecorruptions==1.1.2"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	REPROZOO_OFFLINE=1 $(PY) cli.py fit --config configs/quickstart.yaml

# The fast tier (pyproject's addopts deselect @pytest.mark.slow); test-slow is only the slow tier.
test: $(STAMP)
	$(PY) -m pytest -q tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

# What CI checks (pyproject's [tool.ruff]); `make format` fixes what can be fixed.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmark-engression: $(STAMP)
	$(PY) benchmarks/engression_fig4.py
