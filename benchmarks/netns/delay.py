#!/usr/bin/env python3
"""One-way delay in user space: hold every packet NFQUEUE hands us for --delay-ms, then accept.

For kernels without netem (benchmarks/netns/testbed.sh). Put the rule on the *receiver's* INPUT
hook, inside the receiver's network namespace, and run this daemon in that namespace too (each
namespace has its own queues):

    iptables -A INPUT -i eth0 -j NFQUEUE --queue-num 1 --queue-bypass
    python delay.py --queue 1 --delay-ms 20

Every packet arriving on eth0 (data and ACKs alike) is then released delay-ms after it arrived, in
arrival order (the delay is constant, so a FIFO is the release order). The OUTPUT hook is the wrong
place: holding a sender's own packets there trips TCP small-queues back-pressure and throughput
collapses (2.2 of 10 Mbit/s, /work/shared/reference/environment.md section 3).

Only packet metadata is copied to user space (COPY_META): the verdict needs the packet id, not
its bytes. SIGTERM/SIGINT release every held packet, unbind the queue and exit 0; the last line on
stderr is a JSON summary (packets, deepest queue, how late releases were).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import signal
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=1, help="NFQUEUE number (iptables --queue-num)")
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay per packet, ms")
    p.add_argument("--max-len", type=int, default=65536, help="packets the kernel may queue for us")
    p.add_argument(
        "--ready-file", default=None, help="touched once the queue is bound (for the testbed)"
    )
    p.add_argument(
        "--realtime",
        type=int,
        default=0,
        metavar="PRIO",
        help="run under SCHED_FIFO at this priority (1-99) so compute on a busy machine does "
        "not add to the delay; 0 = normal scheduling (default)",
    )
    args = p.parse_args(argv)
    if not (args.delay_ms >= 0):
        p.error("--delay-ms must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from netfilterqueue import COPY_META, NetfilterQueue
    except ImportError:
        print("delay.py: netfilterqueue is missing; run benchmarks/netns/setup.sh", file=sys.stderr)
        return 2
    if args.realtime:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.realtime))
        except (OSError, AttributeError) as exc:
            print(f"delay.py: SCHED_FIFO refused ({exc}); normal scheduling", file=sys.stderr)

    delay_s = args.delay_ms / 1e3
    held: collections.deque = collections.deque()  # (release_at, packet), arrival order
    stats = {"queue": args.queue, "delay_ms": args.delay_ms, "packets": 0, "max_held": 0}
    late_sum = 0.0
    late_max = 0.0

    def on_packet(pkt) -> None:
        held.append((time.monotonic() + delay_s, pkt))
        stats["packets"] += 1
        if len(held) > stats["max_held"]:
            stats["max_held"] = len(held)

    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    nfq = NetfilterQueue()
    nfq.bind(args.queue, on_packet, max_len=args.max_len, mode=COPY_META, range=0)
    fd = nfq.get_fd()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{os.getpid()}\n")
    try:
        while not stopping:
            now = time.monotonic()
            while held and held[0][0] <= now:
                release_at, pkt = held.popleft()
                pkt.accept()
                late = now - release_at
                late_sum += late
                late_max = max(late_max, late)
            timeout = min(0.1, held[0][0] - now) if held else 0.1  # 0.1 s: notice a signal
            readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
            if readable:
                nfq.run(block=False)  # every packet waiting on the socket -> on_packet
    finally:
        while held:  # nothing stays stuck in the kernel when we go
            held.popleft()[1].accept()
        nfq.unbind()
        released = max(1, stats["packets"])
        stats["late_mean_ms"] = round(late_sum / released * 1e3, 3)
        stats["late_max_ms"] = round(late_max * 1e3, 3)
        print(json.dumps(stats), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
