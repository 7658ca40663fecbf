"""onnxruntime on the DINOv2-S ONNX export at one thread: one 1025-token forward pass.

    .venv-peers/bin/python benchmarks/peers/ort_bench.py --prepared P.json --out OUT.json

Runs in the peers venv (no torch). One CPU session with intra_op_num_threads =
inter_op_num_threads = 1, sequential execution and every graph optimisation, on the same
448 px astronaut pixels Astra runs; the output is checked against transformers' fp32 output
(max abs difference recorded). One warm-up pass, then REPEATS timed passes, each timed as wall
time and as the thread's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import onnxruntime as ort

    prepared = json.loads(args.prepared.read_text())
    onnx = prepared["onnx"]
    out: dict = {"engine": "onnxruntime", "version": f"onnxruntime {ort.__version__}"}
    if "error" in onnx:
        out["error"] = onnx["error"]
    else:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(onnx["path"], opts, providers=["CPUExecutionProvider"])
        pixels = np.load(prepared["image"]["path"]).astype(np.float32)
        feed = {sess.get_inputs()[0].name: pixels}
        hidden = sess.run(None, feed)[0]  # warm-up
        ref = np.load(onnx["reference"])
        times, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            sess.run(None, feed)
            times.append(round((time.perf_counter() - t0) * 1e3, 1))
            cpu.append(round((time.thread_time() - c0) * 1e3, 1))
        out.update(
            threads={"intra_op_num_threads": 1, "inter_op_num_threads": 1},
            execution_mode="ORT_SEQUENTIAL",
            graph_optimization_level="ORT_ENABLE_ALL",
            providers=sess.get_providers(),
            tokens=int(hidden.shape[1]),
            forward_ms_repeats=times,
            forward_ms_median=round(statistics.median(times), 1),
            forward_ms_min=min(times),
            forward_cpu_ms_repeats=cpu,
            forward_cpu_ms_median=round(statistics.median(cpu), 1),
            max_abs_diff_vs_transformers_fp32=float(np.abs(hidden - ref).max()),
            repeats=args.repeats,
        )
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
