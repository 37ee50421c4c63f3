# Two commands do all set-up on a fresh machine:
#   make demo   fit BNNs on Boston housing with several methods and write the ArviZ report
#   make test   run the test suite
# Each creates and fills the virtual environment if it is missing.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, pinned by default to the machine's local CPU build;
# override e.g. `make test TORCH_SPEC="torch==2.5.1"` or TORCH_SPEC=torch for the registry's newest.
TORCH_SPEC ?= torch==2.13.0+cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.marginalize-installed
DEMO_METHODS ?= map,svi-meanfield,mc-dropout,ensemble,nuts
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/marginalize fit --data boston --model mlp:50 --method $(DEMO_METHODS) --report out/

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) out build *.egg-info
