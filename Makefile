# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast bench validate lds clean
# the optional scale-out dependency (Ray), installed into the same venv for the tests
DIST   := $(VENV)/.distributed-installed

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt pytest
	touch $(PY)

demo: $(PY)
	$(PY) -m influence.demo

$(DIST): $(PY) requirements-distributed.txt
	$(PY) -m pip install --quiet -r requirements-distributed.txt
	touch $(DIST)

test: $(PY) $(DIST)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q --durations=15 tests

# the quick tier for the edit-test loop: every test not marked slow (pytest.ini), each module of influence/ exercised
test-fast: $(PY) $(DIST)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -m "not slow" --durations=5 tests

validate: $(PY)
	$(PY) -m influence.validate

# LDS of every solver against models retrained on random half-subsets (cached in lds_cache/; README)
lds: $(PY)
	$(PY) -m influence.validate --panels lds

bench: $(PY)
	$(PY) benchmarks/run.py

clean:
	rm -rf demo calc_output .pytest_cache
