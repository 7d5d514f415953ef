# Entry points: `make demo` runs the offline demo, `make test` runs the test suite.
# Both create or reuse .venv, install the pinned requirements, and install Debian's
# dataset-fashion-mnist when apt-get is available and we are root.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup fashion-mnist demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

fashion-mnist:
	@if [ -d $(FASHION_DIR) ]; then \
		echo "Fashion-MNIST found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "note: $(FASHION_DIR) is missing and apt-get is unavailable or not root;"; \
		echo "      install Debian's dataset-fashion-mnist or put the four IDX .gz files in a"; \
		echo "      mirror directory named by MSVQ_DATA_MIRROR."; \
	fi

# The demo runs the Snakemake pipeline on config/demo.yaml; the msvq commands it calls
# come from the venv. The default profile sets the cores and the gpu=1 resource. A
# second run finds everything up to date and does nothing.
demo: setup fashion-mnist
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --workflow-profile workflow/profiles/default \
		--configfile config/demo.yaml

test: setup fashion-mnist
	$(BIN)/python -m pytest
