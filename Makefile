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

demo: setup fashion-mnist
	@echo "Offline demo on config/demo.yaml: prepare Fashion-MNIST, pretrain msvq and mocov2,"
	@echo "and compare their kNN top-1 with a random initialisation. Linear evaluation, the"
	@echo "report and the Snakemake/DVC workflow join it as those stages land."
	$(BIN)/msvq check-params config/demo.yaml
	$(BIN)/msvq download fashionmnist --params config/demo.yaml
	$(BIN)/msvq prepare fashionmnist --params config/demo.yaml
	$(BIN)/msvq pretrain --dataset fashionmnist --method msvq --params config/demo.yaml \
		--out results/fashionmnist/msvq/pretrain
	$(BIN)/msvq pretrain --dataset fashionmnist --method mocov2 --params config/demo.yaml \
		--out results/fashionmnist/mocov2/pretrain
	$(BIN)/msvq knn --dataset fashionmnist --params config/demo.yaml --checkpoint random

test: setup fashion-mnist
	$(BIN)/python -m pytest
