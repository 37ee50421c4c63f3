# Two commands do all set-up on a fresh machine:
#   make demo   fit BNNs on Boston housing with several methods and write the ArviZ report
#   make test   run the test suite (docstring examples included)
# Each creates and fills the virtual environment if it is missing.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first: torch==2.13.0 resolves on the public registry and, here, to the local CPU build;
# override e.g. `make test TORCH_SPEC="torch==2.5.1"` or TORCH_SPEC=torch for the registry's newest.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.marginalize-installed
DEMO_METHODS ?= map,svi-meanfield,mc-dropout,ensemble,nuts
PYTEST_ARGS ?= -n 2

.PHONY: demo test test-fast test-varied lint bench clean venv docs notebooks browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/marginalize fit --data boston --model mlp:50 --method $(DEMO_METHODS) --report out/

# Headless Chromium for the test that opens the HTML report (Debian's package); idempotent and
# never fatal: without apt (or root) the browser test skips with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	    >/dev/null 2>&1; } || echo "note: chromium not installed; the report browser test will skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The statistical tier (slow tests and known answers, not the notebooks) as on another machine:
# another set of seeds (tests read MARGINALIZE_TEST_SEED_OFFSET through conftest.rseed), two
# threads instead of one, torch's and MKL's AVX2 kernels instead of AVX-512, OpenBLAS's Haswell
# kernels. A test that passes only by the luck of one seed, CPU or thread count fails here.
# CI runs it after `make test`. (No doctest collection: importing every module would reset the
# thread count.)
VARIED_ENV ?= MARGINALIZE_TEST_SEED_OFFSET=1000 MARGINALIZE_TEST_THREADS=2 OMP_NUM_THREADS=2 \
	MKL_NUM_THREADS=2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell
test-varied: $(STAMP)
	$(VARIED_ENV) $(BIN)/python -m pytest tests -m "slow or statistical" -o addopts="-ra --strict-markers" \
	  --ignore=tests/test_notebooks.py $(PYTEST_ARGS)

# API reference (docs/api.md) and the methods table in docs/guide/methods.md, from the code;
# tests/test_docs.py fails while they are out of date
docs: $(STAMP)
	$(BIN)/python tools/gen_api_docs.py

# run the notebooks with their real settings (minutes each), writing executed copies to out/notebooks/
notebooks: $(STAMP)
	mkdir -p out/notebooks
	$(BIN)/jupyter execute --kernel_name=python3 --output='../out/notebooks/{notebook_name}' notebooks/*.ipynb

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) out build *.egg-info
