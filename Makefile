# ditserve: `make demo` runs the main job on the embedded model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install protos check-protos lint browser test demo clean

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

# Debian's headless Chromium and its driver, for the web page's browser test
# (tests/gateway/test_browser.py). Installed with apt-get when missing and running as root
# (as CI does); otherwise, or if apt-get fails, it says so and that test is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q chromium chromium-driver >/dev/null) \
		|| echo "make browser: apt-get could not install chromium: the browser test will be skipped"; \
	else \
		echo "make browser: chromium/chromedriver missing and not root: the browser test will be skipped"; \
	fi

test: install browser check-protos lint
	$(PY) -m pytest -q -ra

demo: install
	$(VENV)/bin/ditserve demo --out demo.png

clean:
	rm -rf $(VENV) build *.egg-info
