# cg_fast: the two commands of the README do all set-up on a fresh machine.
#   make demo   install, then run the main job on the built-in default (no downloads)
#   make test   install, then run the test suite
# Everything goes into a virtual environment ($(VENV)). Where it has no torch yet, the CPU build
# torch==2.13.0 is installed first, so that no requirement can pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cg_fast-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=77" wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	# --no-build-isolation: setup.py must see the torch installed above (and never fetch another).
	$(PY) -m pip install -q --no-build-isolation -e ".[test,plot,diffusers]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/cg-fast demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
	rm -f cg_fast/_C*.so
