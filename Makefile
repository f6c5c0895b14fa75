# Every target sets up what it needs on a fresh machine: a venv (unless one is active), torch 2.13.0 (CPU build,
# from the local wheel), triton and the rest, and the extension built with --no-build-isolation.
SHELL := /bin/bash
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gptfast-installed
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-full run bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The exact CPU build: a bare `torch` would pull a multi-GB CUDA build onto a CPU machine.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test,hf,bench]'
	@touch $@

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# CI's full mode, after `make test`: only the tests marked slow (the cpu backend past 2^31 elements: about a
# minute and 9 GiB at peak on a 2-core machine).
test-slow: setup
	$(PY) -m pytest -q tests -m slow --runslow $(PYTEST_ARGS)

test-full: setup
	$(PY) -m pytest -q tests --runslow $(PYTEST_ARGS)

# The main job: a short training demo on the embedded corpus and a sample from it, then the benchmark report
# (quick sizes, every op on every backend that runs here) in bench-out/.
run: setup
	$(VENV)/bin/gptfast train --preset tiny --max-steps 200 --out runs/demo --overwrite
	$(VENV)/bin/gptfast generate --checkpoint runs/demo/ckpt.pt --max-new-tokens 200
	$(VENV)/bin/gptfast bench --quick --out bench-out

bench: setup
	$(VENV)/bin/gptfast bench --quick --out bench-out

clean:
	rm -rf build *.egg-info gptfast/_C*.so runs bench-out gpu-check-out
