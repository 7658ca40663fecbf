#!/usr/bin/env bash
# What the senders' cheaper first passes cost in accuracy against the exact float32 search:
# `--search bfloat16` (the default on CPUs with native bf16) and `--search pca` (the default
# elsewhere), in the accuracy tables' settings:
#   SmolLM2-135M perplexity, held-out Austen (16 x 256 tokens), G=1 and G=32, K=1024, kv point
#   DINOv2-S Fashion-MNIST top-1 (500 images, 112 px), G=1 and G=32, K=1024, hidden point
# 4 simulated devices; eval --search makes the simulation search as the runtime's senders do.
# Results: benchmarks/results/search_accuracy/*.json (each with its command and commit).
#   SEARCH_KINDS="float32 pca" ACC_GROUPS=1 SEARCH_RESULTS=benchmarks/results/search_accuracy-zen1 \
#       bash benchmarks/search_accuracy.sh     # a subset, into another machine's folder
set -euo pipefail
cd "$(dirname "$0")/.."
ASTRA=.venv/bin/astra
R=${SEARCH_RESULTS:-benchmarks/results/search_accuracy}
A=${ASTRA_ARTEFACTS:-${ASTRA_HOME:-$HOME/.cache/astra}/artefacts/bench}  # large: kept out of git
mkdir -p "$R" "$A"
SMOL="--model smollm2-135m --seq-len 256"
DINO="--model dinov2-s --image-size 112 --probe-images 2000"

for g in ${ACC_GROUPS:-1 32}; do
  [ -f $A/search-smol-g$g.safetensors ] || $ASTRA calibrate $SMOL --groups $g --point kv \
      --sequences 16 --max-samples 4096 --kmeans-iters 5 \
      --out $A/search-smol-g$g.safetensors --no-progress
  [ -f $A/search-dino-g$g.safetensors ] || $ASTRA calibrate $DINO --groups $g --sequences 128 \
      --out $A/search-dino-g$g.safetensors --no-progress
done
for search in ${SEARCH_KINDS:-float32 bfloat16 pca}; do
  $ASTRA eval $SMOL --artefacts $(for g in ${ACC_GROUPS:-1 32}; do echo $A/search-smol-g$g.safetensors; done) \
      --devices 4 --limit 16 --search $search --json $R/smollm2-$search.json --no-progress
  $ASTRA eval $DINO --artefacts $(for g in ${ACC_GROUPS:-1 32}; do echo $A/search-dino-g$g.safetensors; done) \
      --devices 4 --limit 500 --search $search --json $R/dinov2-$search.json --no-progress
done
