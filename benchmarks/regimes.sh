#!/usr/bin/env bash
# Issue 12's prefill targets in both link regimes, fp32 and bf16, ratios measured side by side
# (astra bench --repeats: every method once, then all again; the record keeps the median pass,
# each repeat's ratio, and work_vs_single: every device's compute over one device's).
#   paper's link:  10 Mbit/s per device, latency 0 (bandwidth only)
#   realistic:     10 Mbit/s per device, 20 ms per message
# Results: benchmarks/results/latency/regimes/<name>/bench.{json,md,png}. Run on an otherwise
# idle machine (timings are CPU-bound); about 30 minutes on 2 cores. Summary and bounds:
# .venv/bin/python benchmarks/regimes_summary.py
#   bash benchmarks/regimes.sh            # everything
#   bash benchmarks/regimes.sh smollm2    # only the runs whose name contains "smollm2"
#   REGIMES_RESULTS=benchmarks/results/latency/regimes-zen1 bash benchmarks/regimes.sh  # another machine
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/astra
R=${REGIMES_RESULTS:-benchmarks/results/latency/regimes}  # another machine: its own folder
ONLY=${1:-}
SMOL="--model smollm2-135m --tokens 1024 --bandwidths 10mbit"
DINO="--model dinov2-s --tokens 1025 --bandwidths 10mbit --tables"

bench() {  # bench NAME ARGS...: one astra bench run into $R/NAME
    local name=$1
    shift
    if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then return; fi
    echo "== $name"
    $A bench "$@" --out "$R/$name"
}

for lat in 0 20; do
    # composed mode (2 and 4 devices on 2 cores): ASTRA against one device, SP and TP
    bench smollm2-fp32-lat$lat $SMOL --latency ${lat}ms --devices 2,4 \
        --methods single,astra,sp-fp32,tp --repeats 3
    bench smollm2-bf16-lat$lat $SMOL --latency ${lat}ms --devices 2,4 \
        --methods single,astra,sp-fp32,tp --repeats 3 --dtype bfloat16
    # the exact search instead of the default (bf16 first pass + exact re-rank on CPUs with
    # native bf16): what the cheaper search saves
    bench smollm2-fp32-exactsearch-lat$lat $SMOL --latency ${lat}ms --devices 2,4 \
        --methods single,astra --repeats 3 --search float32
    bench dinov2-fp32-exactsearch-lat$lat $DINO --latency ${lat}ms --devices 2,4 \
        --methods single,astra --repeats 3 --search float32
    # real worker processes, 2 devices
    bench smollm2-fp32-processes-lat$lat --mode processes $SMOL --latency ${lat}ms \
        --devices 2 --methods single,astra --repeats 5
    bench smollm2-bf16-processes-lat$lat --mode processes $SMOL --latency ${lat}ms \
        --devices 2 --methods single,astra --repeats 5 --dtype bfloat16
    # the encoder (one all-gather per block)
    bench dinov2-fp32-lat$lat $DINO --latency ${lat}ms --devices 2,4 \
        --methods single,astra,sp-fp32,tp --repeats 3
    bench dinov2-bf16-lat$lat $DINO --latency ${lat}ms --devices 2,4 \
        --methods single,astra,sp-fp32,tp --repeats 3 --dtype bfloat16
done
