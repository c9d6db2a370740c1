# ditserve: `make demo` runs the main job on the embedded model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install protos check-protos lint test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[server,test]'
	$(MAKE) protos
	touch $(STAMP)

# Regenerates the Python stubs (with type stubs) from protos/: the only wire contract.
protos:
	$(PY) protos/generate.py

# Fails when the committed stubs differ from a fresh generation.
check-protos: install
	$(PY) protos/generate.py --check

lint: install
	$(PY) -m ruff check services client tests

test: install check-protos lint
	$(PY) -m pytest -q -ra

demo: install
	$(VENV)/bin/ditserve demo --out demo.png

clean:
	rm -rf $(VENV) build *.egg-info
