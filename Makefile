# The two set-up commands for a fresh machine (see README):
#   make demo   export -> model repository -> tritonserver -> gRPC client on sample images
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: venv
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m fasterrcnn demo

# -n: the tests run in as many processes as cores, at most 4 (pytest-xdist), a file per process,
# the longest files first (tests/conftest.py)
test: venv
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -rs --durations=15 -n auto --maxprocesses=4 --dist loadfile $(PYTEST_ARGS)
