#!/usr/bin/env bash
# The issue-4 speed targets, measured side by side with interleaved repeats (astra bench
# --repeats: every method once, then all again; records keep the median pass and each repeat's
# ratio). Results: benchmarks/results/latency/targets/<name>/bench.{json,md,png}.
# Run on an otherwise idle machine: timings are CPU-bound. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/astra
R=benchmarks/results/latency/targets
SMOL="--model smollm2-135m --tokens 1024 --bandwidths 10mbit --latency 20ms"
DINO="--model dinov2-s --tokens 1025 --bandwidths 10mbit --latency 20ms --tables"
ALL=single,astra,sp-fp32,sp-fp16,tp,pp,bp

# 1. 2 devices, real worker processes over gloo: exact (default) and bf16 code search
$A bench --mode processes $SMOL --devices 2 --methods single,astra --repeats 5 \
    --out $R/smollm2-2dev-processes
$A bench --mode processes $SMOL --devices 2 --methods single,astra --repeats 5 \
    --search bfloat16 --out $R/smollm2-2dev-processes-bf16search
# 2. 2 and 4 devices, composed mode, every strategy (fp32, the paper's precision)
$A bench $SMOL --devices 2,4 --methods $ALL --repeats 3 --out $R/smollm2-composed
$A bench $SMOL --devices 2,4 --methods single,astra,tp --repeats 3 --search bfloat16 \
    --out $R/smollm2-composed-bf16search
# 3. every method computing in bf16 (AMX): faster compute, the same links
$A bench $SMOL --devices 2,4 --methods $ALL --repeats 3 --dtype bfloat16 \
    --out $R/smollm2-composed-bf16
# 4. the encoder: one all-gather per block
$A bench --mode processes $DINO --devices 2 --methods single,astra --repeats 3 \
    --out $R/dinov2-2dev-processes
$A bench $DINO --devices 2,4 --methods single,astra,sp-fp32,tp --repeats 3 \
    --out $R/dinov2-composed
# 5. the main job at its defaults
$A run --json $R/run-default.json
