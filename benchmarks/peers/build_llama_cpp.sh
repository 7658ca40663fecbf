#!/usr/bin/env bash
# llama-cpp-python from its sdist (PyPI has no Linux wheel), built once into a cached wheel.
#
#   bash benchmarks/peers/build_llama_cpp.sh PYTHON
#
# Prints the cache folder: it holds the sdist, its unpacked source (src/, whose
# vendor/llama.cpp has convert_hf_to_gguf.py), cmake_args.txt, build.log and, once built, the
# wheel. Exits 1 (with the log's tail on stderr, and the folder still printed) when the build
# fails.
#
# A native build (GGML_NATIVE=ON) dies with "Illegal instruction" on this VM, so the build names
# the instruction sets explicitly, each one only if /proc/cpuinfo lists it. AMX is left out unless
# PEERS_LLAMA_AMX=1: /proc/cpuinfo lists amx_tile/int8/bf16 and arch_prctl grants XTILEDATA, but
# a build with GGML_AMX_* (2026-12-02) died with SIGILL at its first tileloadd in libggml-cpu.so
# on the first prompt (Q4_1). The folder is
# $ASTRA_HOME/wheels/llama-cpp-python-VERSION-KEY (default ~/.cache/astra/wheels), KEY a hash of
# the version and the flags: a rerun on the same CPU reuses the wheel; 10-20 minutes otherwise.
set -euo pipefail

PY=${1:?usage: build_llama_cpp.sh PYTHON}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${PEERS_BUILD_JOBS:-2}
CACHE=${ASTRA_HOME:-$HOME/.cache/astra}/wheels

flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
args=(-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF)
add() { # add GGML_OPTION cpuinfo-flag
    if [[ " $flags " == *" $2 "* ]]; then args+=("-D$1=ON"); else args+=("-D$1=OFF"); fi
}
add GGML_AVX avx
add GGML_AVX2 avx2
add GGML_FMA fma
add GGML_F16C f16c
add GGML_BMI2 bmi2
add GGML_AVX_VNNI avx_vnni
add GGML_AVX512 avx512f
add GGML_AVX512_VBMI avx512vbmi
add GGML_AVX512_VNNI avx512_vnni
add GGML_AVX512_BF16 avx512_bf16
if [[ ${PEERS_LLAMA_AMX:-0} == 1 ]]; then
    add GGML_AMX_TILE amx_tile
    add GGML_AMX_INT8 amx_int8
    add GGML_AMX_BF16 amx_bf16
else # off by default: see below
    args+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
CMAKE_ARGS="${args[*]}"

key=$(printf '%s %s' "$VERSION" "$CMAKE_ARGS" | sha256sum | cut -c1-12)
dir="$CACHE/llama-cpp-python-$VERSION-$key"
mkdir -p "$dir"
printf '%s\n' "$CMAKE_ARGS" >"$dir/cmake_args.txt"

sdist="$dir/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" \
        -d "$dir" >&2
fi
if [[ ! -d "$dir/src/llama_cpp_python-$VERSION" ]]; then
    mkdir -p "$dir/src" && tar -xzf "$sdist" -C "$dir/src"
fi

if ! ls "$dir"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "peers: building llama-cpp-python==$VERSION from source, $JOBS jobs (10-20 min on 2 cores)" >&2
    echo "peers: CMAKE_ARGS=$CMAKE_ARGS" >&2
    start=$(date +%s)
    if ! CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python "$sdist" -w "$dir" \
        >"$dir/build.log" 2>&1; then
        echo "peers: llama-cpp-python build FAILED (CMAKE_ARGS=$CMAKE_ARGS); $dir/build.log ends:" >&2
        tail -30 "$dir/build.log" >&2
        echo "$dir" # the folder with build.log, for the report
        exit 1
    fi
    echo "peers: built in $(($(date +%s) - start)) s" >&2
    echo "$(($(date +%s) - start))" >"$dir/build_seconds.txt"
fi
echo "$dir"
