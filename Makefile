# The README's two commands: `make demo` and `make test`.  Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

# Reinstall when pyproject changes or a package folder gains/loses a file (the editable install is a
# link tree: `strict` mode, which type checkers and IDEs resolve; new modules need a reinstall).
PKG_DIRS := testbed $(filter-out %/__pycache__/,$(wildcard testbed/*/)) attacks defenses models suites

$(STAMP): pyproject.toml $(PKG_DIRS)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run make PYTHON=python3)"; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=strict
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/testbed demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo-out .pytest_cache
