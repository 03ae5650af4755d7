# The front door. `make setup` builds .venv; `make test` runs the offline CPU test suite.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: setup test test-fast demo bench-sampling bench-training tiny-prior sample-tiny reproduce-tables clean

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

DEMO := outputs/demo

# GCFG on the offline tiny prior: prior alone (CFG), then concept + control prompt, where the
# concept model is the null-text conversion of the prior's UNet (trained concept models: ccp-train).
demo: setup
	$(BIN)/ccp-tiny-prior $(DEMO)/prior --seed 0
	$(BIN)/ccp-null-text $(DEMO)/prior $(DEMO)/concept
	$(BIN)/ccp-sample prior.path=$(DEMO)/prior guidance=cfg sampling.num_images=8 sampling.steps=25 hydra.run.dir=$(DEMO)/prior_only
	$(BIN)/ccp-sample prior.path=$(DEMO)/prior concept.path=$(DEMO)/concept guidance=concept_control \
		sampling.num_images=8 sampling.steps=25 hydra.run.dir=$(DEMO)/concept_control
	@echo "grids: $(DEMO)/prior_only/grid.png $(DEMO)/concept_control/grid.png"

tiny-prior: setup
	$(BIN)/ccp-tiny-prior outputs/tiny-prior --seed 0 --with-controlnet

sample-tiny: tiny-prior
	$(BIN)/ccp-sample prior.path=outputs/tiny-prior

bench-sampling: setup
	$(BIN)/python benchmarks/sampling.py --out benchmarks/results

bench-training: setup
	$(BIN)/python benchmarks/training.py --out benchmarks/results

# Tables 1-2 and Figs. 8-10 (conf/reproduce/$(SCALE).yaml): tiny = offline CPU smoke run (< 3 min),
# full = the paper's evaluation on trained SD v1.5 models (docs/evaluation.md). Extra settings: ARGS="key=value ...".
SCALE ?= tiny
reproduce-tables: setup
	$(BIN)/python -m ccp.cli.reproduce scale=$(SCALE) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
