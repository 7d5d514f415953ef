# Entry points: `make demo` runs the offline demo, `make test` runs the test suite.
# Both create or reuse .venv, install the pinned requirements, and install Debian's
# dataset-fashion-mnist when apt-get is available and we are root.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup fashion-mnist demo test clean-demo

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

DEMO := --params config/demo.yaml
DEMO_RESULTS := results/fashionmnist

demo: setup fashion-mnist
	@echo "Offline demo on config/demo.yaml: prepare Fashion-MNIST, pretrain msvq and mocov2,"
	@echo "linear-evaluate them and a random initialisation, then draw the figures and the table."
	@echo "The same stages will run through Snakemake and DVC once the workflow lands."
	$(BIN)/msvq check-params config/demo.yaml
	$(BIN)/msvq download fashionmnist $(DEMO)
	$(BIN)/msvq prepare fashionmnist $(DEMO)
	for method in msvq mocov2; do \
		$(BIN)/msvq pretrain --dataset fashionmnist --method $$method $(DEMO) \
			--out $(DEMO_RESULTS)/$$method/pretrain || exit 1; \
		$(BIN)/msvq linear-eval --dataset fashionmnist --method $$method $(DEMO) \
			--checkpoint $(DEMO_RESULTS)/$$method/pretrain/checkpoint.pt \
			--out $(DEMO_RESULTS)/$$method/linear || exit 1; \
	done
	$(BIN)/msvq linear-eval --dataset fashionmnist --method random --checkpoint random $(DEMO) \
		--out $(DEMO_RESULTS)/random/linear
	$(BIN)/msvq report $(DEMO) --results results --tsne-points 2000

test: setup fashion-mnist
	$(BIN)/python -m pytest
