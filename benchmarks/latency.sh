#!/usr/bin/env bash
# Reproduces the 2026-11-22 sections of benchmarks/latency.md (the current targets table:
# benchmarks/targets.sh). Run on an otherwise idle machine: timings are CPU-bound.
# Every `astra bench` call writes bench.json (records + the exact command), bench.md, bench.png.
set -euo pipefail
cd "$(dirname "$0")/.."
A=.venv/bin/astra
R=benchmarks/results/latency
ALL=single,astra,sp-fp32,sp-fp16,tp,pp,bp

# 1. Targets at 2 devices: real worker processes over gloo, 10 Mbit/s + 20 ms emulated.
$A bench --mode processes --model smollm2-135m --tokens 1024 --devices 2 --bandwidths 10mbit \
    --methods single,astra,sp-fp32,tp,pp,bp --out $R/smollm2-2dev-processes
$A bench --mode processes --model dinov2-s --tokens 1025 --devices 2 --bandwidths 10mbit \
    --methods single,astra,sp-fp32,tp,pp,bp --tables --out $R/dinov2-2dev-processes

# 2. Sweeps, composed mode (each device's compute measured alone; critical path composed).
$A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit,100mbit,1gbit \
    --methods $ALL --out $R/smollm2-sweep
$A bench --model dinov2-s --tokens 1025 --devices 2,4 --bandwidths 10mbit,100mbit,1gbit \
    --methods $ALL --tables --out $R/dinov2-sweep

# 3. Where the time goes / which variant wins (composed, 10 Mbit/s, 20 ms).
$A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit \
    --methods single,astra --placement zigzag --out $R/smollm2-zigzag
$A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit \
    --methods single,astra --point hidden --tables --out $R/smollm2-hidden-tables
$A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit \
    --methods single,astra --codebook-size 256 --out $R/smollm2-k256
$A bench --model smollm2-135m --tokens 1024 --devices 2 --bandwidths 10mbit \
    --methods single,astra --groups 32 --out $R/smollm2-g32
$A bench --model smollm2-135m --tokens 1024 --devices 2 --bandwidths 10mbit \
    --methods single,astra --no-overlap --out $R/smollm2-no-overlap
$A bench --model dinov2-s --tokens 1025 --devices 2,4 --bandwidths 10mbit \
    --methods single,astra --out $R/dinov2-no-tables
$A bench --model dinov2-s --tokens 1025 --devices 2,4 --bandwidths 10mbit \
    --methods single,astra --point kv --out $R/dinov2-kv

# 4. The main job at its defaults (SmolLM2, 2 devices, 10 Mbit/s, 20 ms), as JSON.
$A run --json $R/run-default.json

# 5. Causal prefill: how codes travel and who holds which tokens (SmolLM2, 10 Mbit/s, 20 ms).
#    Three repeats of each variant in real processes, each with its own single-device run, so
#    every ratio is measured side by side; then the same at 4 devices in the composed mode.
for rep in 1 2 3; do
  for v in "stream:--exchange stream" "all-gather:--exchange all-gather" \
           "balanced:--exchange stream --placement balanced"; do
    $A bench --mode processes --model smollm2-135m --tokens 1024 --devices 2 --bandwidths 10mbit \
        --methods single,astra ${v#*:} --out $R/exchange/2dev-${v%%:*}-$rep
  done
done
for v in "stream:--exchange stream" "all-gather:--exchange all-gather" \
         "balanced:--exchange stream --placement balanced"; do
  $A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit \
      --methods single,astra ${v#*:} --out $R/exchange/composed-${v%%:*}
done

# 6. Balanced placement fitted from a measured pass (encode and rebuild costs included) against
#    plain streaming: three interleaved repeats, each with its own single-device run.
for rep in 1 2 3; do
  for v in "stream:" "balanced:--placement balanced"; do
    $A bench --model smollm2-135m --tokens 1024 --devices 2,4 --bandwidths 10mbit \
        --methods single,astra ${v#*:} --out $R/balanced-fit/composed-${v%%:*}-$rep
    $A bench --mode processes --model smollm2-135m --tokens 1024 --devices 2 \
        --bandwidths 10mbit --methods single,astra ${v#*:} --out $R/balanced-fit/2dev-${v%%:*}-$rep
  done
done
