# Two commands set up and run everything on a fresh machine:
#   make train   - create .venv (CPU torch + this package), then pre-train a tiny BART on the embedded corpus
#   make test    - create .venv if needed, then run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# One process (GPU if any, else CPU), named so that accelerate does not guess and warn on every run.
ACCELERATE_CONFIG ?= recipes/accelerate_configs/default.yaml

.PHONY: install train test benchmark

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

train: install
	$(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) recipes/bart_pretrain.py $(ARGS)

# pytest exits 5 when it collects no test; report that instead of failing on it.
test: install
	@$(BIN)/python -m pytest $(ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

benchmark: install
	$(BIN)/python benchmarks/collators.py
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/rollback.py
