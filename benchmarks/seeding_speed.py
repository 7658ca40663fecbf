"""k-means++ seeding of SmolLM2's 60 codebooks (kv point, G=32, K=1024): one at a time, as
calibration did, against all at once (astra.vq.codebook.seed_codebooks), side by side.

    .venv/bin/python benchmarks/seeding_speed.py [--groups 32] [--samples 8192] [--repeats 3]

Writes benchmarks/results/seeding_speed.json with the command, commit and machine."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from astra.provenance import provenance
from astra.storage import write_json
from astra.vq.codebook import GroupedCodebook, _kmeans_plus_plus, seed_codebooks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--codebooks", type=int, default=60, help="30 blocks x (keys, values)")
    p.add_argument("--width", type=int, default=192, help="SmolLM2: 3 kv heads x 64")
    p.add_argument("--samples", type=int, default=8192, help="astra run's calibration")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/seeding_speed.json")
    args = p.parse_args()
    torch.manual_seed(0)
    books = [GroupedCodebook(args.width, args.groups, args.codebook_size)
             for _ in range(args.codebooks)]  # fmt: skip
    samples = [torch.randn(args.samples, args.width) for _ in books]
    one, many = [], []
    for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        for book, x in zip(books, samples):
            _kmeans_plus_plus(book._to_groups(x).contiguous(), args.codebook_size, gen)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        seed_codebooks(books, samples, seed=0)
        many.append(time.perf_counter() - t0)
        print(f"one at a time {one[-1]:.1f} s, all at once {many[-1]:.1f} s", flush=True)
    result = {
        **provenance(sys.argv),
        "settings": vars(args),
        "one_at_a_time_s": one,
        "all_at_once_s": many,
        "speedup_median": statistics.median(one) / statistics.median(many),
    }
    write_json(Path(args.out), result)
    print(f"median speed-up {result['speedup_median']:.1f}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
