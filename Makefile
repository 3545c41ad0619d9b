# One way in: `make test` (install what the tests need, run the whole suite) and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test lint demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check sam_jax convert_weights tests *.py configs benchmarks
	$(VENV)/bin/ruff format --check sam_jax convert_weights tests *.py configs benchmarks

test: install lint
	$(VENV)/bin/pytest -q

# The main job: train a small SAM on the built-in synthetic data, then evaluate it on held-out images.
DEMO_DIR ?= workdir/demo
demo: install
	$(PY) train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(PY) eval.py --checkpoint $(DEMO_DIR)/model --dataset synthetic:test --output $(DEMO_DIR)/eval

clean:
	rm -rf $(VENV) .pytest_cache
