#!/bin/bash
# interleaved A/B: before (252ff92) and after (HEAD) on DINOv2-S
set -x
B="--model dinov2-s --tokens 1025 --tables --bandwidths 10mbit --search pca --methods single,astra --repeats 3"
for i in 1 2; do
  (cd /tmp/before && PYTHONPATH=/tmp/before .venv/bin/astra bench $B --mode processes --devices 2 --latency 0 --out /tmp/ab/before-d2-$i) > /tmp/ab/before-d2-$i.log 2>&1
  (cd /work/main && .venv/bin/astra bench $B --mode processes --devices 2 --latency 0 --out /tmp/ab/after-d2-$i) > /tmp/ab/after-d2-$i.log 2>&1
done
(cd /tmp/before && PYTHONPATH=/tmp/before .venv/bin/astra bench $B --mode composed --devices 4 --latency 0 --out /tmp/ab/before-d4) > /tmp/ab/before-d4.log 2>&1
(cd /work/main && .venv/bin/astra bench $B --mode composed --devices 4 --latency 0 --out /tmp/ab/after-d4) > /tmp/ab/after-d4.log 2>&1
echo done
