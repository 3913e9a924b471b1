# One command each: `make relay` sets up and runs the relay, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install relay test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Editable install: the wheel maps sync/, server/, client/ to foliosync.*; new modules are found at once.
install: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

relay: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/foliosync relay $(ARGS)

test: install typecheck
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects no tests; make would turn that into 2, so decide here.
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install typecheck
	$(BIN)/ruff check .

# mypy resolves foliosync.* from a folder named foliosync, which the repository maps from three;
# a throwaway tree of links gives it that layout.
typecheck: install
	rm -rf .typecheck && mkdir -p .typecheck/foliosync
	ln -s ../../sync ../../server ../../client .typecheck/foliosync/
	cd .typecheck && ../$(BIN)/mypy --strict --ignore-missing-imports --cache-dir ../.mypy_cache -p foliosync

bench: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .typecheck .mypy_cache
