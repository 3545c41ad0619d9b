# One way in: `make test` (install what the tests need, run the whole suite) and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test lint demo clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check sam_jax convert_weights tests *.py configs benchmarks
	$(VENV)/bin/ruff format --check sam_jax convert_weights tests *.py configs benchmarks

# The annotation tool's end-to-end tests drive Debian's chromium (Playwright's own browser
# download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: install lint browser
	$(VENV)/bin/pytest -q

# The main job: train a small SAM on the built-in synthetic data, then evaluate it on held-out images.
DEMO_DIR ?= workdir/demo
demo: install
	$(PY) train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(PY) eval.py --checkpoint $(DEMO_DIR)/model --dataset synthetic:test --output $(DEMO_DIR)/eval

clean:
	rm -rf $(VENV) .pytest_cache
