# Two commands do everything on a fresh machine:
#   make quickstart   set up .venv, then run the quickstart (ML-100K, SmolLM2-135M, frozen vs finetune)
#   make test         set up .venv, then run the test suite
# `make bench` runs the benchmarks. TORCH picks the PyTorch version: the default is the one this project is
# developed with; on a GPU machine use e.g. `make quickstart TORCH='torch>=2.7'` (or preinstall torch).
# PyPI's Linux wheel of it is a CUDA build of a few GB (it runs on CPUs too): TORCH_INDEX adds an index to
# take it from, e.g. `make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU-only one.
# ARGS: more arguments for the quickstart's `evolora run`, e.g. `make quickstart ARGS='--set threads=1'`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
ARGS   ?=
BIN    := $(VENV)/bin

# Set-up skips byte-compiling (about 1.4 min saved); instead each process keeps what it compiles under the venv
# for the next one, even where $PYTHONDONTWRITEBYTECODE is set: a test run starts about twenty Python
# processes, each of which would otherwise compile torch and transformers again (~6 s of CPU each).
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX ?= $(abspath $(VENV))/pycache

.PHONY: quickstart test test-lowest bench lint clean gpu-check

# CONSTRAINTS: a pip constraints file every install of the venv obeys (`test-lowest` uses it).
CONSTRAINTS ?=
PIP_INSTALL = $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile \
	$(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url "$(TORCH_INDEX)")
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

quickstart: $(BIN)/.installed
	$(BIN)/evolora run $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_ctr.py
	$(BIN)/python benchmarks/bench_next_item.py
	$(BIN)/python benchmarks/bench_personalized.py
	$(BIN)/python benchmarks/bench_conventional.py
	$(BIN)/python benchmarks/bench_recommend.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_ranking.py
	$(BIN)/python benchmarks/bench_allocator.py

# On a CUDA machine (a few minutes): CUDA tests, a bf16 quickstart, short benchmarks ->
# benchmarks/results/gpu_check.json. Without a GPU it says so and exits 0.
gpu-check: $(BIN)/.installed
	$(BIN)/python scripts/gpu_check.py

# The suite against the lowest versions pyproject.toml allows (.ci/lowest.txt), in a venv of its own: the
# floors are versions it has passed on. torch 2.7 comes from PyPI, a CUDA build of a few GB that runs on CPUs.
LOWEST ?= .venv-lowest
test-lowest:
	$(MAKE) test VENV=$(LOWEST) CONSTRAINTS=.ci/lowest.txt TORCH=torch

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(LOWEST) *.egg-info .pytest_cache
