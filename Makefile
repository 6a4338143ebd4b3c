# Two commands for a fresh machine: `make demo` and `make test`. Both install first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install test lint demo bench clean

# The stamp depends on the lock and the package metadata, so a second `make install`
# is a no-op and a changed lock reinstalls.
$(STAMP): requirements_lock.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements_lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check legitseg tests tools benchmarks

demo: install
	rm -rf out/demo
	$(BIN)/legitseg run examples/images -m models.yaml -o out/demo
	$(BIN)/python tools/demo_summary.py out/demo

bench: install
	$(BIN)/python benchmarks/run_bench.py

clean:
	rm -rf out .pytest_cache
