# The front door. `make setup` builds .venv; `make test` runs the offline CPU test suite.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: setup test test-fast bench-sampling tiny-prior sample-tiny clean

setup: $(BIN)/ccp-sample

$(BIN)/ccp-sample: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --quiet "setuptools<81" wheel -c constraints.txt
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

tiny-prior: setup
	$(BIN)/ccp-tiny-prior outputs/tiny-prior --seed 0

sample-tiny: tiny-prior
	$(BIN)/ccp-sample prior.path=outputs/tiny-prior

bench-sampling: setup
	$(BIN)/python benchmarks/sampling.py --out benchmarks/results

clean:
	rm -rf outputs multirun .pytest_cache
