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
# Extras for `make install` on an accelerator host, e.g. `make install EXTRAS=tpu,train` on every
# worker of a TPU VM, `make install EXTRAS=cuda12,train` on a CUDA 12 machine (see README, Install).
EXTRAS ?=
comma := ,
STAMP := $(VENV)/.installed$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))

.PHONY: install install-test demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '$(if $(EXTRAS),.[$(EXTRAS)],.)'
	touch $@

$(VENV)/.installed-test: $(PY) setup.py $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $@

install: $(STAMP)

install-test: $(VENV)/.installed-test

# Text -> image with the bundled Shapes model (unclip_jax/assets/shapes): one row per prompt.
DEMO_PROMPTS := --prompt "a large red circle in the center" \
	--prompt "a small blue square at the top left" \
	--prompt "a large yellow triangle at the bottom right" \
	--prompt "a green circle to the left of a purple square" \
	--prompt "a cyan triangle above a red square"
demo: install
	$(VENV)/bin/unclip-jax generate $(DEMO_PROMPTS) --num-images 4 --seed 0 \
		--out out/demo --grid out/demo_grid.png --overwrite

test: install-test
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
