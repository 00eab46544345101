# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# Which PyTorch `make` installs into .venv. The pin is the version the test suite is run with (on our
# CI machine its CPU-only build is on disk, so no multi-GB CUDA download happens there). Any torch >= 2.6
# works: on a GPU machine run `make TORCH_SPEC='torch>=2.6' ...` (or pip-install the build you want into
# .venv first); pip then keeps whatever already satisfies the spec.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := internvl_chat/demo_model
DEMO_IMAGE := .cache/demo/scene.png

.PHONY: install demo test bench eval clean

install: $(STAMP)

# The settings are read with tomllib (Python 3.11); say so before anything is installed.
NEEDS_PY311 = import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else \
	f"internvl-chat needs Python 3.11 or newer, and {sys.executable} is {v.major}.{v.minor}: run make PYTHON=python3.11 (or newer)")

$(STAMP): pyproject.toml
	@echo "==> [1/3] creating $(VENV), a private Python environment for this project"
	@test -x $(BIN)/python || $(PYTHON) -c '$(NEEDS_PY311)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c '$(NEEDS_PY311)' || { echo "remove $(VENV) (make clean) first" >&2; exit 1; }
	@echo "==> [2/3] installing PyTorch ($(TORCH_SPEC)), the largest part: a minute or more"
	@$(BIN)/python -m pip install --progress-bar on --disable-pip-version-check "$(TORCH_SPEC)" | { grep -v '^Requirement already satisfied' || true; }
	@echo "==> [3/3] installing internvl-chat and its dependencies (transformers, rich, pillow, ...)"
	@$(BIN)/python -m pip install --progress-bar on --disable-pip-version-check -e ".[test]" | { grep -v '^Requirement already satisfied' || true; }
	@touch $(STAMP)
	@echo "==> installed; the app is $(BIN)/internvl-chat"

# The demo model is committed (trained by scripts/train_demo_model.py); never replace it silently.
$(DEMO_MODEL)/config.json:
	@echo "the embedded demo model is missing: git checkout $(DEMO_MODEL), or train one with scripts/train_demo_model.py" >&2
	@exit 1

$(DEMO_IMAGE): | $(STAMP)
	$(BIN)/python scripts/make_demo_media.py --out-dir $(dir $(DEMO_IMAGE))

demo: $(STAMP) $(DEMO_MODEL)/config.json $(DEMO_IMAGE)
	$(BIN)/internvl-chat --model $(DEMO_MODEL) --script examples/demo.txt

# Two workers with one thread each: most of the suite is single-threaded subprocess start-ups, and
# OpenMP threads on a core the other worker is using only wait on each other.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --threads 1

eval: $(STAMP)
	$(BIN)/python scripts/eval_demo_model.py --model $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
