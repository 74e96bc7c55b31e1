# The two commands of the README. `make test` is what .ci/run calls.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo clean

$(VENV)/.installed: setup.py requirements/cpu.txt requirements/wandb-tests.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/cpu.txt -e ".[dev,hf,mpi]"
	$(PY) -m pip install -q --target $(VENV)/wandb-site -r requirements/wandb-tests.txt
	touch $@

setup: $(VENV)/.installed

# two workers, a test file each (module fixtures are built once): ~9.5 min instead of ~17 on 2 cores
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: setup
	$(PY) -m megatron_harpe.demo $(ARGS)

clean:
	rm -rf $(VENV) runs
