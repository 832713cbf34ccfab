# unclip-jax: the two quick-start commands are `make demo` and `make test`.
# Everything installs into .venv with the pinned versions in requirements/constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
# 8 simulated CPU devices, as the tests and the CI assume.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install install-test demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) setup.py $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Until the bundled Shapes model exists, the demo runs the most meaningful thing the package can
# already do: the diffusion core sampling a known distribution, and CLIP end to end (see README).
demo: install
	$(VENV)/bin/unclip-jax demo --out out

test: install-test
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
