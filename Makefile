# The two commands of the README:
#   make demo   set up, then run the main job on the embedded synthetic consortium
#   make test   set up, then run the test suite
# Both create .venv on first use and reinstall when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow lint clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edufl demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The slow tests: real SuperLink/SuperNode processes, Ray simulations, the whole demo.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The benchmarks of docs/benchmarks.md (not tests): one table, JSON under runs/bench/.
bench: $(STAMP)
	$(BIN)/python -m bench

# Style (ruff) and the import layers of pyproject.toml's contracts (import-linter).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs
