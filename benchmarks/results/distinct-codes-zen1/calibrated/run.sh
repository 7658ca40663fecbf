#!/bin/bash
# interleaved A/B with the same calibrated codebooks: before (252ff92) and after (HEAD)
ART=$HOME/.cache/astra/artefacts/calibrated-hidden-g1-k1024-41843630a8fce845.safetensors
B="--model dinov2-s --tokens 1025 --tables --bandwidths 10mbit --search pca --methods single,astra --repeats 3 --artefact $ART"
for i in 1 2; do
  (cd /tmp/before && PYTHONPATH=/tmp/before .venv/bin/astra bench $B --mode processes --devices 2 --latency 0 --out /tmp/ab2/before-d2-$i) > /tmp/ab2/before-d2-$i.log 2>&1
  (cd /work/main && .venv/bin/astra bench $B --mode processes --devices 2 --latency 0 --out /tmp/ab2/after-d2-$i) > /tmp/ab2/after-d2-$i.log 2>&1
done
(cd /tmp/before && PYTHONPATH=/tmp/before .venv/bin/astra bench $B --mode composed --devices 4 --latency 0 --out /tmp/ab2/before-d4) > /tmp/ab2/before-d4.log 2>&1
(cd /work/main && .venv/bin/astra bench $B --mode composed --devices 4 --latency 0 --out /tmp/ab2/after-d4) > /tmp/ab2/after-d4.log 2>&1
echo done
