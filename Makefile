# One command each: `make relay` sets up and runs the relay, `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install relay test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Editable install: the wheel maps sync/, server/, client/ to foliosync.*; new modules are found at once.
install: $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"

relay: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/foliosync relay $(ARGS)

test: install
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects no tests; make would turn that into 2, so decide here.
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy -p foliosync

bench: $(BIN)/python
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
