"""Decoding speed, side by side: one device against ASTRA on N devices, in one warm group.

Every repeat runs the same request (a held-out Austen prompt of --tokens tokens, --new-tokens
greedy tokens, EOS ignored) once per method, alternating, in the same worker processes
(astra.group.Group), so both see the same machine state. Reported per method: the median time
to first token, time per output token and whole request, and the per-repeat ASTRA/single
ratios. Both link regimes of the project: the paper's (bandwidth only) and a realistic one
(20 ms per message).

    .venv/bin/python benchmarks/decode.py                      # SmolLM2, 1024 + 32, 2 devices
    .venv/bin/python benchmarks/decode.py --repeats 7 --devices 2 --latency 0 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from astra.datasets import austen_text
from astra.group import Group, GroupConfig
from astra.models import load_tokenizer
from astra.net.link import LinkConfig
from astra.provenance import provenance
from astra.sampling import Sampling
from astra.storage import write_json
from astra.text import encode


def prompt_ids(model_dir: Path, tokens: int) -> list[int]:
    ids = encode(load_tokenizer(model_dir), austen_text("test"))
    if len(ids) < tokens:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids[:tokens]


def measure(config: GroupConfig, tokens: int, new_tokens: int, repeats: int) -> dict:
    greedy = Sampling(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rows: dict[str, list[dict]] = {m: [] for m in config.methods}
    with Group(config, progress=False) as group:
        ids = prompt_ids(group.model_dir, tokens)
        for method in config.methods:  # one unmeasured pass each: caches, allocator, pages
            group.generate(ids, greedy, method=method)
        for r in range(repeats):
            order = config.methods if r % 2 == 0 else tuple(reversed(config.methods))
            for method in order:
                t0 = time.perf_counter()
                out = group.generate(ids, greedy, method=method)
                rec = out.record
                rows[method].append({
                    "ttft_ms": rec.ttft_ms, "tpot_ms": rec.tpot_ms, "total_ms": rec.total_ms,
                    "wall_ms": (time.perf_counter() - t0) * 1e3,
                    "tokens": out.token_ids,
                })
    result = {}
    for method, runs in rows.items():
        result[method] = {
            key: statistics.median(run[key] for run in runs)
            for key in ("ttft_ms", "tpot_ms", "total_ms", "wall_ms")
        }
        result[method]["repeats"] = [{k: v for k, v in run.items() if k != "tokens"}
                                     for run in runs]
    single, astra = rows.get("single"), rows.get("astra")
    if single and astra:
        result["ratios"] = {
            key: [a[key] / s[key] for s, a in zip(single, astra)]
            for key in ("tpot_ms", "total_ms")
        }
        result["ratios"]["median_tpot"] = statistics.median(result["ratios"]["tpot_ms"])
        result["ratios"]["median_speedup_total"] = statistics.median(
            s["total_ms"] / a["total_ms"] for s, a in zip(single, astra))
        result["same_tokens_every_repeat"] = all(
            run["tokens"] == astra[0]["tokens"] for run in astra)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bandwidth", type=float, default=10.0, help="Mbit/s per device")
    parser.add_argument("--latency", type=float, nargs="+", default=[0.0, 20.0],
                        help="ms per message, one run each (default: 0 and 20)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for latency in args.latency:
        config = GroupConfig(
            model=args.model, devices=args.devices, methods=("single", "astra"),
            link=LinkConfig(args.bandwidth, latency), dtype=args.dtype,
        )
        t0 = time.perf_counter()
        result = measure(config, args.tokens, args.new_tokens, args.repeats)
        s, a = result["single"], result["astra"]
        print(f"latency {latency:g} ms: single TTFT {s['ttft_ms']:.0f} TPOT {s['tpot_ms']:.1f} "
              f"total {s['total_ms']:.0f} | ASTRA TTFT {a['ttft_ms']:.0f} TPOT "
              f"{a['tpot_ms']:.1f} total {a['total_ms']:.0f} | TPOT ratio (median of repeats) "
              f"{result['ratios']['median_tpot']:.3f}, request speed-up "
              f"{result['ratios']['median_speedup_total']:.2f}x "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        runs.append({"latency_ms": latency, "bandwidth_mbps": args.bandwidth, **result})
    write_json(Path(args.out), {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": runs, "provenance": provenance(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
