# ditserve: `make demo` runs the main job on the embedded model; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install protos check-protos lint browser test test-cpu-kernels gpu-check-dry demo clean

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

test: install browser check-protos lint test-cpu-kernels gpu-check-dry
	$(PY) -m pytest -q -ra

# float32 results differ between CPUs (torch picks AVX-512, AVX2 or scalar kernels at run
# time): rerun the numerical tests with the AVX2 and the scalar kernels forced, so a bound
# that only holds for this machine's kernels fails here rather than on another CPU.
NUMERICAL_TESTS := tests/model/test_reference_parity.py tests/model/test_stages.py tests/sampling \
	tests/coordinator/test_engine.py tests/chain/test_chain_local.py
test-cpu-kernels: install
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q -p no:cacheprovider $(NUMERICAL_TESTS)
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=SSE4_2 \
		$(PY) -m pytest -q -p no:cacheprovider $(NUMERICAL_TESTS)

# The GPU check's dry run (scripts/gpu-check.sh --device cpu --quick: a tiny model, real
# stage processes, every part in its own process): fails unless every part reports ok,
# so the script that only ever runs on a lent GPU machine is known to work before it does.
gpu-check-dry: install
	PYTHON=$(PY) bash scripts/gpu-check.sh --device cpu --quick --out build/gpu-check-dry

demo: install
	$(VENV)/bin/ditserve demo --out demo.png

clean:
	rm -rf $(VENV) build *.egg-info
