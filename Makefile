# One command each: `make relay` sets up and runs the relay, `make test` sets up and runs the tests.
# Both install foliosync into .venv from a wheel built from this checkout (tools/bootstrap.py), as
# users get it; they may run at the same time (the set-up takes a lock and skips what is done).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BOOTSTRAP := $(PYTHON) tools/bootstrap.py $(VENV)

.PHONY: install dev relay test lint typecheck system-deps services bench clean

install:
	$(BOOTSTRAP) --extras test

# An editable install for a quick edit-and-run loop; `make test` puts the wheel back.
dev:
	$(BOOTSTRAP) --extras test --editable

relay:
	$(BOOTSTRAP)
	$(BIN)/foliosync relay $(ARGS)

# What the suite needs beyond Python: Node.js for the second client, Chromium for the browser test.
system-deps:
	tools/system-deps

# Redis and PostgreSQL on 127.0.0.1 for the adapters' tests: started (or installed) if down.
services:
	tools/services

# Two workers, a test file each at a time (a file's tests share its fixtures and services).
PYTEST_ARGS ?= -n 2 --dist loadfile

test: install system-deps services typecheck
	$(BIN)/ruff check .
	@# pytest exits 5 when it collects no tests; make would turn that into 2, so decide here.
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(MAKE) typecheck
	$(BIN)/ruff check .

# mypy resolves foliosync.* from a folder named foliosync, which the repository maps from four;
# a throwaway tree of links gives it that layout. It uses the venv's mypy (`make install`).
TYPECHECK_DIR ?= .typecheck
typecheck:
	rm -rf $(TYPECHECK_DIR) && mkdir -p $(TYPECHECK_DIR)/foliosync
	ln -s $(CURDIR)/sync $(CURDIR)/server $(CURDIR)/client $(TYPECHECK_DIR)/foliosync/
	ln -s $(CURDIR)/package/* $(TYPECHECK_DIR)/foliosync/
	cd $(TYPECHECK_DIR) && $(abspath $(BIN))/mypy --strict --ignore-missing-imports --cache-dir $(abspath $(TYPECHECK_DIR)).cache -p foliosync

bench:
	$(BOOTSTRAP) --extras test,bench
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(VENV).lock build dist *.egg-info .typecheck .typecheck.cache .mypy_cache
