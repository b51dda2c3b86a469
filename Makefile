# ebpfsvc: make setup | test | demo | bench | lint | clean
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export BCC_KERNEL_SOURCE ?= /var/lib/ebpfsvc/kernel-headers
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-unit test-bpf test-e2e demo bench bench-quick lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-bpf: setup
	$(PY) -m pytest tests/bpf

test-e2e: setup
	$(PY) -m pytest tests/e2e

demo: setup
	$(PY) -m ebpfsvc.cli demo

bench: setup
	$(PY) -m ebpfsvc.cli bench

bench-quick: setup
	$(PY) -m ebpfsvc.cli bench --quick

lint: setup
	$(PY) -m pyflakes ebpfsvc tests

clean:
	-$(PY) -m ebpfsvc.cli lab down --all 2>/dev/null
	rm -rf .pytest_cache build *.egg-info results
