# Quick start: `make serve`, `make test`. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test serve train finetune ship evaluate export bench lint clean

setup: $(STAMP)

# Idempotent: reinstalls only when the lock file or pyproject.toml changed.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

test: setup
	$(PY) -m pytest

# The service on http://127.0.0.1:8000 (ONNX Runtime here; exports the ONNX first if it is missing or stale).
serve: setup
	$(PY) -m service

export: setup
	$(PY) -m export all

# Resumes the run's checkpoint; on a machine without one, continues the shipped run instead
# (either with the configuration recorded in the run).
train: setup
	if [ -f runs/alexnet_acmix/last.pdparams ]; then $(PY) -m model.train --resume; \
	else $(PY) -m model.train --continue-from model/weights; fi

# Stage 2: a short fine-tune of the run's best weights, lower lr and lighter augmentation
# (the augmented training accuracy stays at the validation accuracy); resumes its checkpoint.
FINETUNE := runs/alexnet_acmix_finetune
finetune: setup
	if [ -f $(FINETUNE)/last.pdparams ]; then $(PY) -m model.train --resume --out $(FINETUNE); \
	else $(PY) -m model.train --out $(FINETUNE) --init-weights runs/alexnet_acmix/best.pdparams \
	  --epochs 8 --lr 1e-4 --crop-scale-min 0.8 --rotation 0 --jitter 0.1; fi

# A run's best weights (RUN=runs/alexnet_acmix_finetune for stage 2) into model/weights/,
# evaluated, with a fresh model card.
RUN ?= runs/alexnet_acmix
ship: setup
	$(PY) -m model.ship --run $(RUN)

evaluate: setup
	$(PY) -m model.evaluate

# All benchmarks; figures in docs/bench/results.json and docs/bench/*.png. Needs wrk (apt-get install wrk).
bench: setup build/alexnet_acmix.onnx
	$(PY) -m benchmarks

build/alexnet_acmix.onnx: model/weights/alexnet_acmix.pdparams | setup
	$(PY) -m export onnx --out $@

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build .pytest_cache
