#!/usr/bin/env bash
# Peers side by side (issue 12, item 4), one command, everything at ONE thread:
#   SmolLM2-135M, 1024-token prefill + 32 greedy new tokens: llama.cpp (llama-cpp-python built
#     from source; Q4_1 as shipped, F32 and BF16 GGUFs converted from Astra's HF dir; flash
#     attention off and on), transformers fp32/bf16, Astra single device, ASTRA on 2 devices
#     (processes) and 4 (composed) at 10 Mbit/s with 0 and 20 ms latency, fp32 and bf16;
#   DINOv2-S at 1025 tokens (448 px): onnxruntime on an ONNX export, transformers fp32/bf16,
#     Astra single, ASTRA on 2 and 4 devices as above.
# Writes benchmarks/results/peers/peers.json and benchmarks/peers.md (tables; the notes section
# between <!-- notes --> markers is kept). The first run builds llama-cpp-python (10-20 min on
# 2 cores; the wheel is cached under $ASTRA_HOME/wheels) and the peers venv .venv-peers; the
# measuring takes about 15 minutes. Timings are CPU-bound: run on an otherwise idle machine
# (the load before and after is recorded).
#
#   bash benchmarks/peers.sh            # PEERS_REPEATS=3 by default
#   PEERS_RESULTS=benchmarks/results/peers-zen1 PEERS_MD=benchmarks/peers-zen1.md bash benchmarks/peers.sh
#                                       # a second machine, beside the first one's results
#   PEERS_ASTRA_DTYPES=float32 ...        # Astra's rows in fp32 only (bf16 is emulated, slow, on AVX2)
set -uo pipefail # not -e: an engine that fails is reported, the others still run
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
A=$ROOT/.venv/bin/astra
PEERS=$ROOT/.venv-peers
RES=${PEERS_RESULTS:-benchmarks/results/peers}  # another machine: its own folder and page
MD=${PEERS_MD:-benchmarks/peers.md}
WORK=${ASTRA_HOME:-$HOME/.cache/astra}/peers
REPEATS=${PEERS_REPEATS:-3}
ASTRA_DTYPES=${PEERS_ASTRA_DTYPES:-float32 bfloat16}  # Astra's rows; on a CPU without native bf16, float32
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1
say() { echo "peers: $*" >&2; }

[[ -x $PY ]] || { say "no project venv at .venv: run scripts/setup.sh first"; exit 1; }
mkdir -p "$RES/raw" "$RES/astra" "$WORK"

# 1. llama-cpp-python: a wheel built from the sdist, cached (a failure is recorded, not fatal)
BUILD=$(bash benchmarks/peers/build_llama_cpp.sh "$PY")
build_rc=$?
WHEEL=""
[[ $build_rc -eq 0 && -n $BUILD ]] && WHEEL=$(ls "$BUILD"/llama_cpp_python-*.whl 2>/dev/null | head -1)
LLAMA_SRC=$(ls -d "$BUILD"/src/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1)
[[ $build_rc -eq 0 && -n $WHEEL ]] || say "llama-cpp-python build failed: llama.cpp rows will be missing"

# 2. the peers venv: pinned engines and dependencies, the project venv untouched
stamp=$( (cat benchmarks/peers/requirements.txt; echo "$WHEEL") | sha256sum | cut -c1-16)
if [[ ! -x $PEERS/bin/python || $(cat "$PEERS/.peers-stamp" 2>/dev/null) != "$stamp" ]]; then
    say "making $PEERS"
    rm -rf "$PEERS"
    "$PY" -m venv "$PEERS" || exit 1
    reqs=$(mktemp)
    if [[ -n $WHEEL ]]; then
        cp benchmarks/peers/requirements.txt "$reqs"
    else
        grep -v '^llama-cpp-python' benchmarks/peers/requirements.txt >"$reqs"
    fi
    "$PEERS/bin/python" -m pip install --quiet --no-cache-dir ${WHEEL:+--find-links "$BUILD"} \
        --only-binary :all: -r "$reqs" || exit 1
    rm -f "$reqs"
    echo "$stamp" >"$PEERS/.peers-stamp"
fi
# sentencepiece for llama.cpp's GGUF converter, in a side folder (benchmarks/peers/convert-requirements.txt)
if [[ ! -d $WORK/convert-deps/sentencepiece ]]; then
    "$PY" -m pip install --quiet --no-deps --target "$WORK/convert-deps" \
        -r benchmarks/peers/convert-requirements.txt || say "sentencepiece install failed"
fi

# 3. inputs and model files: prompt ids, pixels, F32/BF16 GGUFs, the DINOv2 ONNX export
"$PY" benchmarks/peers/prepare.py --work "$WORK" ${LLAMA_SRC:+--llama-src "$LLAMA_SRC"} \
    --convert-deps "$WORK/convert-deps" >/dev/null || exit 1
cp "$WORK/prepared.json" "$RES/raw/prepared.json"

load() { # uptime, CPU pressure and the busiest processes: other work on the machine skews timings
    uptime
    sed 's/^/cpu pressure: /' /proc/pressure/cpu 2>/dev/null
    ps -eo pcpu=,etime=,args= --sort=-pcpu | head -6 | cut -c1-160 | sed 's/^/process: /'
}
load | tee "$RES/raw/uptime_before.txt"
# 4. the peer engines
rm -f "$RES"/raw/{llamacpp,ort,hf}.json "$RES"/raw/llamacpp_error.txt
if [[ -n $WHEEL ]]; then
    say "llama.cpp"
    "$PEERS/bin/python" benchmarks/peers/llamacpp_bench.py --prepared "$WORK/prepared.json" \
        --out "$RES/raw/llamacpp.json" --repeats "$REPEATS" 2> >(tee "$RES/raw/llamacpp.log" >&2)
    rc=$?
    if [[ $rc -ne 0 ]]; then # e.g. 132: SIGILL, an instruction this VM lacks
        say "llama.cpp bench failed (exit $rc)"
        { echo "exit status $rc"; tail -5 "$RES/raw/llamacpp.log"; } >"$RES/raw/llamacpp_error.txt"
    fi
fi
say "onnxruntime"
"$PEERS/bin/python" benchmarks/peers/ort_bench.py --prepared "$WORK/prepared.json" \
    --out "$RES/raw/ort.json" --repeats "$REPEATS" || say "onnxruntime bench failed"
say "transformers"
"$PY" benchmarks/peers/hf_bench.py --prepared "$WORK/prepared.json" --out "$RES/raw/hf.json" \
    --repeats "$REPEATS" || say "transformers bench failed"

# 5. Astra: prefill with `astra bench` (interleaved repeats, single device alongside), then
#    decoding with `astra run` (TTFT and TPOT, one pass each)
rm -rf "$RES"/astra/*
: >"$RES/raw/astra_commands.txt"
astra() { # the command, logged to raw/astra_commands.txt, then run
    echo "astra $*" >>"$RES/raw/astra_commands.txt"
    "$A" "$@"
}
SMOL="--model smollm2-135m --tokens 1024 --bandwidths 10mbit"
DINO="--model dinov2-s --tokens 1025 --bandwidths 10mbit --tables"
for dt in $ASTRA_DTYPES; do
    for lat in 0 20ms; do
        for name in smollm2 dinov2; do
            if [[ $name == smollm2 ]]; then flags=$SMOL; else flags=$DINO; fi
            say "astra bench $name $dt latency $lat"
            astra bench --mode processes $flags --latency $lat --devices 2 --methods single,astra \
                --dtype $dt --repeats "$REPEATS" --out "$RES/astra/$name-2dev-processes-$dt-lat$lat" \
                || say "astra bench $name 2dev $dt $lat failed"
            astra bench --mode composed $flags --latency $lat --devices 4 --methods single,astra \
                --dtype $dt --repeats "$REPEATS" --out "$RES/astra/$name-4dev-composed-$dt-lat$lat" \
                || say "astra bench $name 4dev $dt $lat failed"
        done
        for dev in 2:processes 4:composed; do
            n=${dev%%:*} mode=${dev##*:}
            out="$RES/astra/run-smollm2-${n}dev-$mode-$dt-lat$lat"
            say "astra run smollm2 $n devices ($mode) $dt latency $lat"
            astra run --model smollm2-135m --tokens 1024 --new-tokens 32 --methods single,astra \
                --devices "$n" --mode "$mode" --bandwidth 10mbit --latency $lat --dtype $dt \
                --json "$out.json" >"$out.log" 2>&1 || say "astra run $dev $dt $lat failed: $out.log"
        done
    done
done
load | tee "$RES/raw/uptime_after.txt"

# 6. peers.json and peers.md
"$PY" benchmarks/peers/report.py --results "$RES" ${BUILD:+--build "$BUILD"} \
    --command "bash benchmarks/peers.sh (PEERS_REPEATS=$REPEATS${PEERS_RESULTS:+ PEERS_RESULTS=$PEERS_RESULTS PEERS_MD=$MD}${PEERS_ASTRA_DTYPES:+ PEERS_ASTRA_DTYPES=$PEERS_ASTRA_DTYPES})" --md "$MD"
