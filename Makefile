# Two commands for a fresh machine: `make demo` and `make test`. Both install first.
# The venv is made with the first Python >= 3.11 on PATH (tools/find_python.sh says
# which); `make PYTHON=python3.13 test` asks for one.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: install test lint demo bench clean python

# The stamp depends on the lock and the package metadata, so a second `make install`
# is a no-op and a changed lock reinstalls.
$(STAMP): requirements_lock.txt pyproject.toml
	@test -x $(BIN)/python || { py=$$($(SHELL) tools/find_python.sh) && $$py -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements_lock.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# The optional Ray extra (--engine ray), so that CI runs its test too.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): requirements_ray.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements_ray.txt
	touch $(RAY_STAMP)

# The optional DICOM extra (DICOM inputs, annotations --format dicom-seg), so that CI runs its tests too.
DICOM_STAMP := $(VENV)/.installed-dicom
$(DICOM_STAMP): requirements_dicom.txt $(STAMP)
	$(BIN)/python -m pip install -q -r requirements_dicom.txt
	touch $(DICOM_STAMP)

# Which Python a fresh `make install` would use.
python:
	@$(SHELL) tools/find_python.sh >/dev/null

test: install $(RAY_STAMP) $(DICOM_STAMP)
	@$(SHELL) tools/ensure_chromium.sh
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint: install
	$(BIN)/ruff check legitseg tests tools benchmarks

demo: install
	rm -rf out/demo
	$(BIN)/legitseg run examples/images -m models.yaml -o out/demo
	$(BIN)/legitseg summary out/demo
	$(BIN)/legitseg evaluate out/demo examples/ground_truth --quiet
	$(BIN)/legitseg report out/demo -o out/demo/report.html
	@echo "demo report: out/demo/report.html (evaluation: out/demo/evaluation/)"
	$(BIN)/legitseg verify examples/verification -m models.yaml -o out/demo/verification

bench: install
	$(BIN)/python benchmarks/run_bench.py

clean:
	rm -rf out .pytest_cache
