# prvr developer entry points. Every install goes through requirements.lock,
# the one place versions are pinned (torch==2.13.0 CPU wheel included).
#   make test    install (once), check the import layers and run the whole test suite
#   make demo    end-to-end demo on synthetic data
#   make serve   start TorchServe with the registered production model
#   make ui      the search page (http://127.0.0.1:8000/) in front of TorchServe with that model
#   make lint    hadolint the Dockerfile
#   make lock    rewrite requirements.lock from the current .venv (after changing a pin)
#   make clean   remove the venv and caches

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install.stamp
TORCH  := torch==2.13.0
PIP    := $(BIN)/python -m pip

.PHONY: install demo test serve ui lint lock clean

install: $(STAMP)

# The venv is rebuilt only when the lock or the package metadata change,
# so a repeated `make test` goes straight to pytest.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c requirements.lock $(TORCH)
	$(PIP) install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prvr demo

# The import layers first (pyproject.toml [tool.importlinter]: a module imports only from the
# layers below it), then the suite. pytest exits 5 when nothing was collected; that must fail
# the build too (make fails on any non-zero status, so 5 is never swallowed here).
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# Package the registry's production model (`make demo` registers one) into
# model_store/prvr-<version>.mar and run TorchServe in the foreground (Ctrl-C stops it).
# API keys: runs/serve/key_file.json; see docs/serving.md.
serve: $(STAMP)
	mar=$$($(BIN)/prvr package --out model_store) && \
	$(BIN)/prvr serve --model-store model_store --mar "$$mar" --foreground

# Package the production model as for `make serve`, start TorchServe from runs/serve, and serve the
# search page on 127.0.0.1:8000 in front of it (`prvr ui --help`: --host/--port, or --url and
# --key-file for a TorchServe started elsewhere). Ctrl-C stops the page and TorchServe.
ui: $(STAMP)
	mar=$$($(BIN)/prvr package --out model_store) && \
	$(BIN)/prvr ui --serve "$$mar"

lint: $(STAMP)
	$(BIN)/hadolint Dockerfile

# To change a version: install it into .venv with `-c requirements.lock` lifted for that one
# package (edit its line first), check `pip check`, then `make lock`. torch stays 2.13.0;
# the local label (+cpu) is dropped so the same lock serves CPU and CUDA wheels.
lock: $(STAMP)
	$(PIP) check
	$(PIP) freeze --exclude-editable | grep -v '^prvr==' \
	    | sed -E 's/^(torch==[^+]*)\+.*$$/\1/' | LC_ALL=C sort -f > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
