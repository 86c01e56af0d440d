#!/bin/sh
# Builds the llama.cpp baseline's own environment for `make bench` (not the project's .venv):
#   ENV/bin/python     a venv with llama-cpp-python built from its sdist (llama.cpp from
#                      source, -march=native: AVX-512, VNNI and bf16 where the CPU has them;
#                      on a CPU with AMX, those flags named instead, see GGML_FLAGS)
#   ENV/llama.cpp/     llama.cpp's own GGUF converter from the same sdist (convert_hf_to_gguf.py,
#                      conversion/, gguf-py/); it imports torch, so it runs under .venv's python
#   ENV/.built         written last: the environment is complete
#   ENV/.failed        written instead when a step fails; ENV/build.log says which
# About 5 minutes on 2 cores, once: `make bench-env` reruns it only when this script changes.
#
#   sh benchmarks/llamacpp_env.sh [ENV]   (default .bench-venv)
set -u
ENV=${1:-.bench-venv}
VERSION=0.3.36
PYTHON=${PYTHON:-python3}
JOBS=$(nproc 2>/dev/null || echo 2)

# On an Intel Xeon with AMX (family 6 model 207, in a VM), -march=native built a
# llama.cpp that died of SIGILL on its first compute, at every precision; built with the
# AVX-512 flags named and no AMX, it ran. CPUs without AMX (the AMD EPYC this bench was
# made on) keep -march=native.
if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
    GGML_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    GGML_FLAGS="$GGML_FLAGS -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON"
    GGML_FLAGS="$GGML_FLAGS -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    FLAGS_SAID="AVX-512 flags without AMX"
else
    GGML_FLAGS="-DGGML_NATIVE=ON"
    FLAGS_SAID="native CPU flags"
fi

rm -rf "$ENV"
mkdir -p "$ENV"
LOG="$ENV/build.log"
echo "building llama.cpp (llama-cpp-python $VERSION, $FLAGS_SAID) into $ENV:" \
    "once, about 5 minutes on 2 cores; log in $LOG"

# Each step's failure is named in ENV/.failed; its output is in the log.
build() {
    step() {
        what=$1
        shift
        "$@" || { echo "$what failed" >"$ENV/.failed"; return 1; }
    }
    step "python -m venv" "$PYTHON" -m venv "$ENV" || return 1
    step "upgrading pip" "$ENV/bin/pip" install -q --upgrade pip || return 1
    # The sdist, kept: it carries llama.cpp's converter, which the wheel does not.
    step "downloading the llama-cpp-python sdist" "$ENV/bin/pip" download -q --no-deps \
        --no-binary :all: "llama-cpp-python==$VERSION" -d "$ENV/sdist" || return 1
    sdist="$ENV/sdist/llama_cpp_python-$VERSION.tar.gz"
    src="llama_cpp_python-$VERSION/vendor/llama.cpp"
    step "unpacking the converter" tar -xzf "$sdist" -C "$ENV/sdist" \
        "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" || return 1
    mv "$ENV/sdist/$src" "$ENV/llama.cpp" && rm -rf "$ENV/sdist/llama_cpp_python-$VERSION"
    # GGML_NATIVE: -march=native (llama.cpp turns it off when SOURCE_DATE_EPOCH is set, as
    # reproducible-build setups do, so it is named here). LLAVA_BUILD=OFF: the multimodal
    # library is a minute of compiling the benchmark never loads.
    step "building llama-cpp-python" env -u SOURCE_DATE_EPOCH \
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        CMAKE_ARGS="$GGML_FLAGS -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release" \
        "$ENV/bin/pip" install -v --no-binary llama-cpp-python "$sdist" || return 1
    step "importing llama_cpp" "$ENV/bin/python" -c "import llama_cpp" || return 1
}

start=$(date +%s)
if build >"$LOG" 2>&1; then
    date -u +%Y-%m-%dT%H:%M:%SZ >"$ENV/.built"
    echo "llama.cpp bench env ready in $(($(date +%s) - start)) s: $ENV"
else
    echo "llama.cpp bench env: $(cat "$ENV/.failed") (see $LOG)" >&2
    exit 1
fi
