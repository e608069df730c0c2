# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench validate clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt pytest
	touch $(PY)

demo: $(PY)
	$(PY) -m influence.demo

test: $(PY)
	$(PY) -m pytest -q tests

validate: $(PY)
	$(PY) -m influence.validate

bench: $(PY)
	$(PY) benchmarks/run.py

clean:
	rm -rf demo calc_output .pytest_cache
