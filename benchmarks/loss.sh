#!/usr/bin/env bash
# Packet loss (paper Table 11 analogue, issue 14 item 7): accuracy at 0, 1, 5 and 10 % packet
# loss, codes in MTU-sized packets without retransmission, with and without XOR parity.
#   benchmarks/loss.sh [smollm2|dinov2] ...   (default: both; results in benchmarks/results/loss)
set -euo pipefail
cd "$(dirname "$0")/.."
ASTRA="nice -n 10 .venv/bin/astra"
R=benchmarks/results/loss
A=${ASTRA_ARTEFACTS:-${ASTRA_HOME:-$HOME/.cache/astra}/artefacts/bench}  # large: kept out of git
mkdir -p "$R" "$A"
SMOL="--model smollm2-135m --seq-len 256"
DINO="--model dinov2-s --image-size 112 --probe-images 2000"
RATES=0,0.01,0.05,0.1

smollm2() {  # held-out Austen perplexity, kv point, G=1 and G=32, 2 and 4 devices
  for g in 1 32; do
    [ -f $A/smol-kv-g$g.safetensors ] || $ASTRA calibrate $SMOL --point kv --groups $g \
      --sequences 16 --max-samples 4096 --kmeans-iters 5 --out $A/smol-kv-g$g.safetensors --no-progress
  done
  for parity in 0 1; do
    $ASTRA eval $SMOL --artefacts $A/smol-kv-g1.safetensors $A/smol-kv-g32.safetensors \
      --devices 2,4 --limit 16 --loss $RATES --parity $parity --no-progress \
      --json $R/smollm2_parity$parity.json
  done
}

dinov2() {  # Fashion-MNIST top-1 (linear head), 112 px = 64 patches + CLS, 4 devices
  for g in 1 32; do
    [ -f $A/dino-g$g.safetensors ] || $ASTRA calibrate $DINO --groups $g --sequences 128 \
      --out $A/dino-g$g.safetensors --no-progress
  done
  for parity in 0 1; do
    $ASTRA eval $DINO --artefacts $A/dino-g1.safetensors $A/dino-g32.safetensors --devices 4 \
      --limit 500 --loss $RATES --parity $parity --no-progress --json $R/dinov2_parity$parity.json
  done
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(smollm2 dinov2)
for s in "${stages[@]}"; do "$s"; done
