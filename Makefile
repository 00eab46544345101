# The two commands a new user runs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
# This machine's CPU build of torch; GPU users: `make TORCH_SPEC='torch>=2.6' ...` or install torch first.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := internvl_chat/demo_model
DEMO_IMAGE := .cache/demo/scene.png

.PHONY: install demo test bench eval clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# The demo model is committed (trained by scripts/train_demo_model.py); never replace it silently.
$(DEMO_MODEL)/config.json:
	@echo "the embedded demo model is missing: git checkout $(DEMO_MODEL), or train one with scripts/train_demo_model.py" >&2
	@exit 1

$(DEMO_IMAGE): | $(STAMP)
	$(BIN)/python scripts/make_demo_media.py --out-dir $(dir $(DEMO_IMAGE))

demo: $(STAMP) $(DEMO_MODEL)/config.json $(DEMO_IMAGE)
	$(BIN)/internvl-chat --model $(DEMO_MODEL) --script examples/demo.txt

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --threads 1

eval: $(STAMP)
	$(BIN)/python scripts/eval_demo_model.py --model $(DEMO_MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
