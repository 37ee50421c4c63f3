# Two commands do all set-up on a fresh machine:
#   make demo   fit BNNs on Boston housing with several methods and write the ArviZ report
#   make test   run the test suite
# Each creates and fills the virtual environment if it is missing.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first. torch==2.13.0 is on the public registry (PyPI); on Linux PyPI's
# wheel is the CUDA build (it pulls the nvidia-* libraries). Choose a build with TORCH_SPEC and
# TORCH_PIP_ARGS, e.g. the CPU-only wheel:
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# or a CUDA 12.4 one:
#   make test TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.marginalize-installed
DEMO_METHODS ?= map,svi-meanfield,mc-dropout,ensemble,nuts
DEMO_ARGS ?= --data boston --model mlp:50 --noise 0.3 --method $(DEMO_METHODS) --report out/ --json out/results.json
PYTEST_ARGS ?= -n 2

# ArviZ 1.x (DataTree) needs Python >= 3.12: `make test-arviz1` runs the ArviZ tests there in
# $(VENV312) (created when missing). Python 3.12 comes from PYTHON312, else python3.12 on the
# PATH, else pyenv. torch for it: TORCH312_INDEX (the CPU-only wheels) when that index can be
# reached, else the registry's torch==2.13.0 (on Linux the CUDA build: about 2.7 GB the first
# time, then from pip's cache).
VENV312 ?= .venv312
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python; do \
  $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 && { echo $$p; break; }; done)
TORCH312_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP312 := $(VENV312)/.marginalize-installed
ARVIZ_TESTS ?= tests/test_arviz.py tests/test_diagnostics.py tests/test_report.py tests/test_evaluation.py src/marginalize/core/arviz.py src/marginalize/diagnostics/evaluation.py

.PHONY: demo picture test test-fast test-arviz1 lint bench clean venv docs notebooks browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The README's command; its report (out/report.html) is the README's picture (`make picture`).
demo: $(STAMP)
	$(BIN)/marginalize fit $(DEMO_ARGS)

# Render out/report.html (from `make demo`) to docs/report.png with headless Chromium.
picture: browser
	test -f out/report.html || { echo "run make demo first"; exit 1; }
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
	  --window-size=1150,3900 --screenshot=docs/report.png out/report.html

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

$(STAMP312): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "test-arviz1: Python 3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	@if $(VENV312)/bin/python -c "import urllib.request as u; u.urlopen('$(TORCH312_INDEX)/torch/', timeout=10)" >/dev/null 2>&1; then \
	  echo "torch for Python 3.12: CPU wheels from $(TORCH312_INDEX)"; \
	  $(VENV312)/bin/python -m pip install -q --index-url $(TORCH312_INDEX) --extra-index-url https://pypi.org/simple "$(TORCH_SPEC)"; \
	else \
	  echo "note: $(TORCH312_INDEX) cannot be reached; installing the registry's $(TORCH_SPEC) (the CUDA build on Linux)"; \
	  $(VENV312)/bin/python -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(VENV312)/bin/python -m pip install -q -e ".[test]" "arviz>=1"
	touch $(STAMP312)

# The ArviZ tests under Python 3.12 with arviz >= 1 (DataTree); a few minutes.
test-arviz1: $(STAMP312)
	$(VENV312)/bin/python -c "import arviz, sys; v = arviz.__version__; print('python', sys.version.split()[0], 'arviz', v); sys.exit(int(v.split('.')[0]) < 1)"
	$(VENV312)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(ARVIZ_TESTS)

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
	rm -rf $(VENV) $(VENV312) out build *.egg-info
