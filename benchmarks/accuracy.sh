#!/usr/bin/env bash
# Accuracy tables for issue 3 (benchmarks/accuracy.md): full precision vs ASTRA calibrated /
# fine-tuned on 4 simulated devices. CPU-sized limits (2 shared cores): see accuracy.md.
#   benchmarks/accuracy.sh [dinov2|dinov2-ft|dinov2-long|smollm2|minilm|ablations] ...
#   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
ASTRA="nice -n 10 .venv/bin/astra"
R=benchmarks/results
A=${ASTRA_ARTEFACTS:-${ASTRA_HOME:-$HOME/.cache/astra}/artefacts/bench}  # large: kept out of git
mkdir -p "$R" "$A"
DINO="--model dinov2-s --image-size 112 --probe-images 2000"
SMOL="--model smollm2-135m --seq-len 256"
MINI="--model minilm-l6 --seq-len 128"

dinov2() {  # Table 1 analogue: Fashion-MNIST top-1, 112 px = 64 patches + CLS, 4 devices
  for g in 1 16 32; do
    $ASTRA calibrate $DINO --groups $g --sequences 128 --force --out $A/dino-g$g.safetensors \
      --json $R/dinov2_calibrate_g$g.json --no-progress
  done
  $ASTRA eval $DINO --artefacts $A/dino-g1.safetensors $A/dino-g16.safetensors $A/dino-g32.safetensors --devices 4 \
    --limit 500 --json $R/dinov2_eval_calibrated.json --no-progress
}

dinov2_ft() {  # short fine-tunes from the calibrated codebooks, G=32 then G=1
  for g in 32 1; do
    $ASTRA finetune $DINO --init $A/dino-g$g.safetensors --devices 4 --steps ${DINO_STEPS:-60} \
      --batch-size 8 --lr 2e-6 --beta 2e-4 --lam 1.0 --placement mixed \
      --checkpoint $A/dino-g$g-ft.ckpt --checkpoint-every 10 --force --out $A/dino-g$g-ft.safetensors \
      --json $R/dinov2_finetune_g$g.json --no-progress
  done
  $ASTRA eval $DINO --artefacts $A/dino-g32-ft.safetensors $A/dino-g1-ft.safetensors --devices 4 --limit 500 \
    --no-full-precision --json $R/dinov2_eval_finetuned.json --no-progress
}

dinov2_long() {  # 300-step distilled fine-tunes (the targets), and the same recipe in full
  # precision on 1 device as the control: how much of the gain is just more training
  local common="$DINO --steps 300 --batch-size 8 --lr 2e-6 --beta 2e-4 --distill 1.0 \
    --placement mixed --checkpoint-every 50 --no-progress"
  for g in 32 1; do
    $ASTRA finetune $common --init $A/dino-g$g.safetensors --devices 4 --lam 1.0 \
      --checkpoint $A/dino-g$g-long.ckpt --force --out $A/dino-g$g-long.safetensors \
      --json $R/dinov2_finetune_g${g}_long.json
  done
  $ASTRA finetune $common --init $A/dino-g1.safetensors --devices 4 --lam 0 \
    --checkpoint $A/dino-g1-long-lam0.ckpt --force --out $A/dino-g1-long-lam0.safetensors \
    --json $R/dinov2_finetune_g1_long_lam0.json
  $ASTRA finetune $common --init $A/dino-g32.safetensors --devices 1 --lam 0 \
    --checkpoint $A/dino-fp-long.ckpt --force --out $A/dino-fp-long.safetensors \
    --json $R/dinov2_finetune_fp_long.json
  $ASTRA eval $DINO --artefacts $A/dino-g32-long.safetensors $A/dino-g1-long.safetensors $A/dino-g1-long-lam0.safetensors \
    --devices 4 --limit 500 --json $R/dinov2_eval_finetuned_long.json --no-progress
  $ASTRA eval $DINO --artefacts $A/dino-fp-long.safetensors --devices 1 --limit 500 --no-full-precision \
    --json $R/dinov2_eval_fp_long.json --no-progress
}

smollm2() {  # Table 3 analogue: perplexity on held-out Austen, kv point, 4 devices
  $ASTRA calibrate $SMOL --point kv --groups 1 --sequences 16 --max-samples 4096 \
    --kmeans-iters 5 --force --out $A/smol-kv-g1.safetensors --json $R/smollm2_calibrate_g1.json --no-progress
  $ASTRA calibrate $SMOL --point kv --groups 32 --sequences 16 --max-samples 4096 \
    --kmeans-iters 5 --force --out $A/smol-kv-g32.safetensors --json $R/smollm2_calibrate_g32.json --no-progress
  $ASTRA eval $SMOL --artefacts $A/smol-kv-g1.safetensors $A/smol-kv-g32.safetensors --devices 4 --limit 16 \
    --json $R/smollm2_eval_calibrated.json --no-progress
}

texts() {  # issue 13: every real decoder on two texts, training-free G=1 and G=32, 2 and 4
  # devices; codebooks calibrated on Austen's train split only (Moby-Dick is unseen text)
  for g in 1 32; do
    [ -f $A/smol-kv-g$g.safetensors ] || $ASTRA calibrate $SMOL --point kv --groups $g \
      --sequences 16 --max-samples 4096 --kmeans-iters 5 --force --out $A/smol-kv-g$g.safetensors \
      --json $R/smollm2_calibrate_g$g.json --no-progress
  done
  for d in austen moby-dick; do
    $ASTRA eval $SMOL --dataset $d --artefacts $A/smol-kv-g1.safetensors $A/smol-kv-g32.safetensors \
      --devices 2,4 --limit 16 --json $R/texts_smollm2_$d.json --no-progress
  done
  # the text encoder: cosine to its full-precision embeddings on the same two texts
  for g in 1 32; do
    [ -f $A/minilm-g$g.safetensors ] || $ASTRA calibrate $MINI --groups $g --sequences 64 --force \
      --out $A/minilm-g$g.safetensors --json $R/minilm_calibrate_g$g.json --no-progress
  done
  for d in austen moby-dick; do
    $ASTRA eval $MINI --dataset $d --artefacts $A/minilm-g1.safetensors $A/minilm-g32.safetensors \
      --devices 2,4 --limit 64 --json $R/texts_minilm_$d.json --no-progress
  done
}

minilm() {  # cosine similarity to the full-precision embeddings, 4 devices
  for g in 1 32; do
    $ASTRA calibrate $MINI --groups $g --sequences 64 --force --out $A/minilm-g$g.safetensors \
      --json $R/minilm_calibrate_g$g.json --no-progress
  done
  $ASTRA eval $MINI --artefacts $A/minilm-g1.safetensors $A/minilm-g32.safetensors --devices 4 --limit 64 \
    --json $R/minilm_eval_calibrated.json --no-progress
}

ablations() {  # Tables 12-14 analogues on DINOv2 G=1 (largest effects), short fine-tunes
  local common="$DINO --init $A/dino-g1.safetensors --devices 4 --steps ${ABL_STEPS:-20} --batch-size 8 \
    --lr 2e-6 --placement mixed --no-progress"
  $ASTRA finetune $common --lam 0 --force --out $A/abl-lam0.safetensors --json $R/abl_lam0.json
  $ASTRA finetune $common --lam 1 --force --out $A/abl-lam1.safetensors --json $R/abl_lam1.json
  $ASTRA finetune $common --class-tokens single --force --out $A/abl-single.safetensors --json $R/abl_single.json
  $ASTRA finetune $common --beta 0 --force --out $A/abl-beta0.safetensors --json $R/abl_beta0.json
  $ASTRA finetune $common --beta 0.25 --force --out $A/abl-beta025.safetensors --json $R/abl_beta025.json
  $ASTRA eval $DINO --artefacts $A/abl-lam0.safetensors $A/abl-lam1.safetensors $A/abl-single.safetensors $A/abl-beta0.safetensors \
    $A/abl-beta025.safetensors --devices 4 --limit 300 --json $R/ablations_eval.json \
    --no-progress
  $ASTRA eval $DINO --artefacts $A/dino-g1.safetensors --devices 4 --limit 300 --no-full-precision \
    --json $R/ablations_eval_calibrated_ref.json --no-progress
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(dinov2 dinov2-ft dinov2-long smollm2 minilm ablations)
for s in "${stages[@]}"; do
  echo "== $s  $(date -u +%FT%TZ)"
  "${s//-/_}"
done
