# mgpumanager: `make demo` runs the broker on simulated consumers (no GPU
# needed); `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo run test bench bench-quick soak check-config clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/mgpumanager demo

run: install
	$(BIN)/mgpumanager serve

check-config: install
	$(BIN)/mgpumanager check-config $(or $(CONFIG),etc/consumers.yaml)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench.py

bench-quick: install
	$(BIN)/python bench/bench.py --quick

# make soak MINUTES=30 for a longer one
MINUTES ?= 3
soak: install
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache test-output
