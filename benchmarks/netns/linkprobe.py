#!/usr/bin/env python3
"""Time single messages through Astra's Communicator: the link model alone, without a model.

Runs as one rank of a torchrun-style group (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
ASTRA_SECRET or ASTRA_SECRET_FILE in the environment), e.g. one per namespace under
benchmarks/netns/testbed.sh (a real shaped link: --bandwidth inf --latency 0) or as N local
processes over loopback (the emulated link: --bandwidth 10mbit --latency 20ms). Both sides run the
same Communicator calls (astra.net.comm), so any difference is the link model's error.

Patterns, each for every size in --sizes, repeated --repeats times:
  p2p         rank 0 send_tensor()s one message to every other rank (what ASTRA's streamed
              prefill does: codes to the devices holding later tokens); time from rank 0's send
              to the last receiver holding the message.
  all_gather  every rank all_gather_bytes() the size (ASTRA's all-gather exchange, the SP
              baselines); time from the last rank's start to the last rank's finish.
Before each message the ranks sync on a barrier and then sleep --gap seconds: a gap longer than
TCP's retransmission timeout (>= 200 ms) restarts the connection from its initial window
(tcp_slow_start_after_idle), which is what a per-layer exchange separated by compute sees.
Clocks: time.time() of one host (namespaces share it), so one-way times are exact.
Rank 0 writes --json (atomically): every measurement plus the link and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from astra.net.comm import Communicator, all_gather_json  # noqa: E402
from astra.net.launch import init_from_env  # noqa: E402
from astra.net.link import LinkConfig  # noqa: E402


def parse_size(text: str) -> int:
    text = text.strip().lower()
    for suffix, mult in (("kb", 1000), ("mb", 1000**2), ("k", 1024), ("m", 1024**2)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bandwidth", default="inf", help="emulated uplink (astra syntax), e.g. 10mbit")
    p.add_argument("--latency", default="0", help="emulated one-way latency, e.g. 20ms")
    p.add_argument("--sizes", default="1280,16k,128k,1m", help="message sizes in bytes (k, m)")
    p.add_argument("--patterns", default="p2p,all_gather")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gap", type=float, default=0.3, help="idle seconds before each message")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--corrected", action="store_true", help="emulate with corrected_link.py's model"
    )
    args = p.parse_args()
    if args.corrected:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import corrected_link

        corrected_link.install()

    torch.set_num_threads(1)
    rank, world, group = init_from_env("gloo", args.timeout)
    link = LinkConfig.from_strings(args.bandwidth, args.latency)
    comm = Communicator(group, link, timeout_s=args.timeout)
    ideal = Communicator(group, LinkConfig(), timeout_s=args.timeout)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    patterns = [s.strip() for s in args.patterns.split(",") if s.strip()]

    # warm the connections (gloo connects lazily on first use) with tiny messages
    for _ in range(2):
        ideal.all_gather_bytes(torch.zeros(16, dtype=torch.uint8))
        if rank == 0:
            for j in range(1, world):
                ideal.send_tensor(torch.zeros(16, dtype=torch.uint8), j)
            ideal.wait_sends()
        else:
            ideal.recv_tensor(0)

    rows = []  # on every rank: (pattern, size, repeat, t_start, t_end) for its own part
    for pattern in patterns:
        for size in sizes:
            payload = torch.randint(0, 255, (size,), dtype=torch.uint8)
            if pattern == "all_gather":  # untimed: the slot grows to this size (one round)
                comm.barrier()
                comm.all_gather_bytes(payload)
            for rep in range(args.repeats):
                comm.barrier()
                if rank != 0 and pattern == "p2p":
                    time.sleep(max(0.0, args.gap - 0.1))  # receivers ready before the send
                else:
                    time.sleep(args.gap)
                if pattern == "p2p":
                    if rank == 0:
                        t0 = time.time()
                        for j in range(1, world):
                            comm.send_tensor(payload, j)
                        comm.wait_sends()
                        t1 = time.time()
                    else:
                        t0 = time.time()
                        comm.recv_tensor(0)
                        t1 = time.time()
                elif pattern == "all_gather":
                    t0 = time.time()
                    comm.all_gather_bytes(payload)
                    t1 = time.time()
                else:
                    raise SystemExit(f"unknown pattern {pattern!r}")
                rows.append([pattern, size, rep, t0, t1])
        comm.wait_sends()
    stats = comm.stats.to_dict()
    gathered = all_gather_json(ideal, {"rank": rank, "rows": rows, "comm": stats})
    if rank == 0:
        results = []
        by_rank = [g["rows"] for g in gathered]
        for k, (pattern, size, rep, _, _) in enumerate(by_rank[0]):
            parts = [r[k] for r in by_rank]
            if pattern == "p2p":
                start = parts[0][3]
                end = max(r[4] for r in parts[1:]) if world > 1 else parts[0][4]
            else:
                start = max(r[3] for r in parts)
                end = max(r[4] for r in parts)
            results.append(
                {"pattern": pattern, "size": size, "repeat": rep, "ms": (end - start) * 1e3}
            )
        summary = {}
        for r in results:
            summary.setdefault(f"{r['pattern']}:{r['size']}", []).append(r["ms"])
        out = {
            "world_size": world,
            "link": {"bandwidth": args.bandwidth, "latency": args.latency},
            "gap_s": args.gap,
            "corrected": args.corrected,
            "host": socket.gethostname(),
            "results": results,
            "median_ms": {k: statistics.median(v) for k, v in summary.items()},
            "comm": [g["comm"] for g in gathered],
        }
        for key, ms in out["median_ms"].items():
            print(f"{key:>18}  {ms:9.1f} ms")
        if args.json:
            path = Path(args.json)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(out, indent=1) + "\n")
            os.replace(tmp, path)
    comm.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's teardown (its threads can abort the process at exit)


if __name__ == "__main__":
    sys.exit(main())
