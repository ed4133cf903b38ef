# Two commands for a newcomer: `make demo` and `make test`. Both build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL ?= models/tiny-llama
PYTEST_ARGS ?=

.PHONY: venv demo test bench-ops clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(DEMO_MODEL)/config.json: | venv
	$(PY) -m mlora tiny-model $(DEMO_MODEL) --arch llama

demo: venv $(DEMO_MODEL)/config.json
	$(PY) -m mlora train configs/demo.yaml --overwrite

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf out runs models
