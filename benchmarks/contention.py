"""How much a pass slows down when the machine's other cores run one too: the ceiling that
`--mode processes` puts on any speed-up measured on this machine.

In processes mode every emulated device is a process on its own core, but those cores share
the machine's last-level cache and memory bandwidth, which real devices do not. The one-device
reference runs alone. So even with no overhead at all, N devices in processes mode reach at
most N / (slow-down with N concurrent passes). The composed mode runs the devices' compute one
after another, each with the machine to itself, and has no such ceiling.

This script times one device's whole pass (every block, one thread) alone, then with `--copies`
identical passes started at once in separate processes, alternating, and writes the median
times, their ratio and the ceiling.

    .venv/bin/python benchmarks/contention.py                       # DINOv2-S, 1025 tokens
    .venv/bin/python benchmarks/contention.py --model smollm2-135m --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from astra.provenance import provenance
from astra.storage import write_json

PASS_SCRIPT = """
import json, sys, time, torch
from astra.hub import resolve_model
from astra.models.loading import load_model
from astra.parallel.passes import embed_inputs, prepare_weights_
from astra.runner import RunConfig, build_inputs
torch.set_num_threads(1)
model_name, tokens, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
start_at = float(sys.argv[4])
model_dir = resolve_model(model_name)
inputs, _, _ = build_inputs(RunConfig(model=model_name, tokens=tokens), model_dir)
model = load_model(model_dir)
prepare_weights_(model, "float32", "full")
x = embed_inputs(model, inputs)
positions = torch.arange(x.shape[1])
def one_pass():
    with torch.no_grad():
        t = time.perf_counter()
        h = x
        for block in model.blocks:
            h = block(h, positions, None)
        return (time.perf_counter() - t) * 1e3
one_pass()  # warm-up
time.sleep(max(0.0, start_at - time.time()))  # the copies start their timed passes together
print(json.dumps([one_pass() for _ in range(passes)]))
"""


def timed_passes(model: str, tokens: int, passes: int, copies: int) -> list[list[float]]:
    """Each copy's pass times (ms), `copies` processes started together."""
    start_at = time.time() + 20.0  # after every copy has loaded and warmed up
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PASS_SCRIPT, model, str(tokens), str(passes), str(start_at)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
        for _ in range(copies)
    ]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"a timed pass failed with exit status {proc.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dinov2-s")
    ap.add_argument("--tokens", type=int, default=1025)
    ap.add_argument("--copies", type=int, default=2, help="concurrent passes (devices)")
    ap.add_argument("--passes", type=int, default=3, help="timed passes per process per round")
    ap.add_argument("--rounds", type=int, default=2, help="alone/together alternations")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/contention.json"))
    args = ap.parse_args()
    if args.copies < 2:
        raise SystemExit(f"--copies must be at least 2, got {args.copies}")
    alone, together = [], []
    for round_ in range(args.rounds):
        alone += timed_passes(args.model, args.tokens, args.passes, 1)[0]
        for times in timed_passes(args.model, args.tokens, args.passes, args.copies):
            together += times
        print(f"round {round_ + 1}: alone {statistics.median(alone):.0f} ms, "
              f"{args.copies} at once {statistics.median(together):.0f} ms", flush=True)
    slowdown = statistics.median(together) / statistics.median(alone)
    result = {
        "model": args.model,
        "tokens": args.tokens,
        "copies": args.copies,
        "alone_ms": [round(t, 1) for t in alone],
        "together_ms": [round(t, 1) for t in together],
        "median_alone_ms": round(statistics.median(alone), 1),
        "median_together_ms": round(statistics.median(together), 1),
        "slowdown": round(slowdown, 4),
        "processes_mode_ceiling": round(args.copies / slowdown, 3),
        "provenance": provenance(),
    }
    write_json(args.out, result)
    print(f"slow-down {slowdown:.3f}x with {args.copies} passes at once: processes mode can show "
          f"at most {args.copies / slowdown:.2f}x on {args.copies} devices here; wrote {args.out}")


if __name__ == "__main__":
    main()
