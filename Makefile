# `make demo` and `make test` create .venv on first use and install everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA ?=

.PHONY: install test demo bench clean

install: $(INSTALLED)

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build); then
# the package without build isolation, so fairseq's C++ extensions compile against that torch
# instead of pip fetching another torch into a throwaway build environment.
$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0 'numpy<2' cython
	$(BIN)/pip install --no-build-isolation -e '.[test,demo]'
	touch $@

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

demo: $(INSTALLED)
	$(BIN)/python -m examples.demo $(if $(DATA),--data $(DATA))

bench: $(INSTALLED)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs *.egg-info
