# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast bench validate lds clean
# the optional scale-out dependency (Ray), installed into the same venv for the tests
DIST   := $(VENV)/.distributed-installed
# the test runner and pytest-xdist, which runs the suite in TEST_WORKERS processes (one test file each at a time)
TESTDEPS := $(VENV)/.test-installed
TEST_WORKERS ?= 2

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(PY)

demo: $(PY)
	$(PY) -m influence.demo

$(DIST): $(PY) requirements-distributed.txt
	$(PY) -m pip install --quiet -r requirements-distributed.txt
	touch $(DIST)

$(TESTDEPS): $(PY)
	$(PY) -m pip install --quiet pytest pytest-xdist
	touch $(TESTDEPS)

test: $(PY) $(DIST) $(TESTDEPS)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# the quick tier for the edit-test loop: every test not marked slow (pytest.ini), each module of influence/ exercised
test-fast: $(PY) $(DIST) $(TESTDEPS)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" --durations=5 tests

validate: $(PY)
	$(PY) -m influence.validate

# LDS of every solver against models retrained on random half-subsets (cached in lds_cache/; README)
lds: $(PY)
	$(PY) -m influence.validate --panels lds

bench: $(PY)
	$(PY) benchmarks/run.py

clean:
	rm -rf demo calc_output .pytest_cache
