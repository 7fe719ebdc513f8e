# Two commands set up and run everything on a fresh machine:
#   make train   - create .venv (CPU torch + this package), then pre-train a tiny BART on the embedded corpus
#   make test    - create .venv if needed, then run the test suite (`make test-unit`: tests/unit only, under a minute)
# CI (.ci/run) also runs `make test-floor` (the trainer/callback tests on the oldest supported transformers and
# accelerate) and `make typecheck` (mypy on hf_stability/).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# One process (GPU if any, else CPU), named so that accelerate does not guess and warn on every run.
ACCELERATE_CONFIG ?= recipes/accelerate_configs/default.yaml

# The floor is the lowest `transformers`/`accelerate` that pyproject.toml accepts (its single home). The floor job
# installs them without dependencies into $(FLOOR), which shadows the venv's copies through PYTHONPATH, so no second
# torch install is needed; it runs the tests at the trainer/callback seams with upstream internals.
FLOOR := .ci/floor
floor_version = $(shell sed -n 's/^ *"$(1)>=\([0-9.]*\)",$$/\1/p' pyproject.toml)
FLOOR_TRANSFORMERS := $(call floor_version,transformers)
FLOOR_ACCELERATE := $(call floor_version,accelerate)
FLOOR_TESTS ?= tests/integration/test_compat.py tests/integration/test_trainer.py tests/integration/callbacks tests/unit/callbacks tests/integration/step tests/unit/step
VERSIONS := import torch, transformers, accelerate; \
	print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")

# $(call pytest,ENV,ARGS): print the versions, run pytest; exit 5 (no test collected) is reported, not a failure.
define pytest
@$(1) $(BIN)/python -c '$(VERSIONS)'
@$(1) $(BIN)/python -m pytest $(2); status=$$?; \
if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status
endef

.PHONY: install train test test-unit test-floor typecheck benchmark

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

train: install
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) recipes/bart_pretrain.py $(ARGS)

test: install
	$(call pytest,,$(ARGS))

test-unit: install
	$(call pytest,,tests/unit $(ARGS))

test-floor: install
	rm -rf $(FLOOR)
	$(BIN)/python -m pip install --no-deps --target $(FLOOR) \
		transformers==$(FLOOR_TRANSFORMERS) accelerate==$(FLOOR_ACCELERATE)
	$(call pytest,PYTHONPATH=$(CURDIR)/$(FLOOR),$(FLOOR_TESTS) $(ARGS))

typecheck: install
	$(BIN)/python -m mypy

benchmark: install
	$(BIN)/python benchmarks/collators.py
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/rollback.py
