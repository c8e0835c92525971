# Quick start: `make serve`, `make test`. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test serve train ship evaluate export bench lint protos locks clean

# TensorRT's Python bindings, one folder per major version the TensorRT code is written for (both are
# the module tensorrt_bindings), without TensorRT's libraries (NVIDIA's own index): the code's calls are
# checked against them without a GPU (harness/nvidia_bindings.py). 11.2.1.2 is the GPU image's TensorRT.
TENSORRT_BINDINGS := 10.16.1.11 11.2.1.2
BINDINGS := $(foreach v,$(TENSORRT_BINDINGS),$(VENV)/tensorrt-$(v)/.installed)

# KServe's own Python SDK in a venv of its own (it needs protobuf<7; the project pins 7), for the test
# that runs its clients against a real server (tests/service/test_server.py). Only `make test` makes it.
KSERVE_SDK := $(VENV)/kserve-sdk/.installed

setup: $(STAMP) $(BINDINGS)

# Idempotent: reinstalls only when the lock file or pyproject.toml changed.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

$(VENV)/tensorrt-%/.installed: | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(VENV)/tensorrt-$* \
	  tensorrt-cu13-bindings==$*
	touch $@

$(KSERVE_SDK): harness/kserve_sdk.lock | $(STAMP)
	test -x $(VENV)/kserve-sdk/bin/python || $(PYTHON) -m venv $(VENV)/kserve-sdk
	@echo "installing KServe's SDK into $(VENV)/kserve-sdk (for one test; a minute the first time)"
	$(VENV)/kserve-sdk/bin/python -m pip install --quiet --disable-pip-version-check -r harness/kserve_sdk.lock
	touch $@

# Two processes (pytest-xdist): most tests wait on servers and child processes; plain `pytest` runs serially.
test: setup $(KSERVE_SDK)
	$(PY) -m pytest -n 2

# The service on http://127.0.0.1:8000 (ONNX Runtime here; exports the ONNX first if it is missing or stale).
serve: setup
	$(PY) -m service

export: setup
	$(PY) -m export all

# Resumes the run's checkpoint; on a machine without one, continues the shipped run instead
# (either with the configuration recorded in the run). RUN= another run folder.
RUN ?= runs/alexnet_acmix
train: setup
	if [ -f $(RUN)/last.pdparams ]; then $(PY) -m model.train --resume --out $(RUN); \
	else $(PY) -m model.train --continue-from model/weights --out $(RUN); fi

# A run's best weights into model/weights/, evaluated (lossless and JPEG), calibrated, with a fresh
# model card; PROXIES= the recipe search's proxy runs, for the card.
PROXIES ?=
ship: setup
	$(PY) -m model.ship --run $(RUN) $(if $(PROXIES),--proxies $(PROXIES))

evaluate: setup
	$(PY) -m model.evaluate

# All benchmarks; figures in docs/bench/results.json and docs/bench/*.png. Needs wrk (apt-get install wrk).
bench: setup build/alexnet_acmix.onnx
	$(PY) -m benchmarks

build/alexnet_acmix.onnx: model/weights/alexnet_acmix.pdparams | setup
	$(PY) -m export onnx --out $@

lint: setup
	$(PY) -m ruff check .

# The gRPC messages from service/kserve_grpc/proto/kserve_v2.proto (grpcio-tools, in the development lock).
protos: setup
	$(PY) -m grpc_tools.protoc -I service/kserve_grpc/proto --python_out=service/kserve_grpc/proto \
	  service/kserve_grpc/proto/kserve_v2.proto

# The images' runtime locks, each for its own image's Python (uv, in the development lock).
locks: setup
	cd docker && ../$(VENV)/bin/uv pip compile requirements-runtime.in --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-header -o requirements-runtime-py311.lock
	cd docker && ../$(VENV)/bin/uv pip compile requirements-runtime-gpu.in --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 --no-header -o requirements-runtime-py312.lock

clean:
	rm -rf build .pytest_cache
