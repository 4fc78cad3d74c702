# `make demo` and `make test` work on a fresh machine with Python >= 3.10 and pip: each creates .venv
# when absent. torch is installed before the project, from TORCH_SPEC, and the project keeps it: PyPI's Linux
# wheel brings the CUDA libraries, so a CPU-only machine takes PyTorch's CPU wheel with
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint env docs docs-site clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,mpi]' || $(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m ep_runtime demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

env: $(VENV)/.installed
	$(PY) -m ep_runtime env

docs: $(VENV)/.installed
	$(PY) -m ep_runtime env --markdown > docs/environment_variables.md

# The documentation site (MkDocs + mkdocstrings: API reference from the docstrings) in build/site, warnings as errors.
# mkdocstrings reads the package as it installs: dispatchers/ and runners/ staged inside ep_runtime/ by symlinks.
docs-site: $(VENV)/.installed
	$(PY) -c "import mkdocstrings_handlers.python" 2>/dev/null || $(PY) -m pip install -q -e '.[docs]'
	rm -rf build/docs-src && mkdir -p build/docs-src/ep_runtime
	ln -s $(CURDIR)/ep_runtime/*.py $(CURDIR)/ep_runtime/bench build/docs-src/ep_runtime/
	ln -s $(CURDIR)/dispatchers build/docs-src/ep_runtime/dispatchers
	ln -s $(CURDIR)/runners build/docs-src/ep_runtime/runners
	$(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
