#!/usr/bin/env python3
"""The link model corrected for what gloo over TCP actually does, installed at run time.

A proposal, measured in benchmarks/network.md; it does not edit astra/. `install()` patches
astra.net.link.Uplink and astra.net.comm.Communicator.recv_tensor in this process only, so that

  * p2p (send_tensor/recv_tensor; ASTRA's streamed prefill): gloo sends an unbound buffer only
    once the receiver's NOTIFY_RECV_READY has arrived (gloo/transport/tcp/pair.cc: "sends cannot
    execute until the remote side is ready to receive"), and recv_tensor is two gloo messages
    (a header, then the payload, whose receive is posted only when the header has arrived). With
    s the send stamp (uplink start) and r the moment the receiver called recv_tensor:
        arrival = max(s, r + L) + 3 L + wire(bytes) / B
    instead of s + L + bytes*8/B. A receiver that asks late (r > s) pays 4 L from its request.
  * all_gather (dist.all_gather_single -> gloo's ring allgather): N-1 ring steps, each a fresh
    receive notification (L) and the data (L + slot/B):
        arrival = s + (N-1) * (2 L + wire(bytes) / B)
    instead of s + L + (N-1)*bytes*8/B.
  * every byte on the wire carries TCP/IP/Ethernet framing: wire(b) = b * 1514 / 1448 * 8 bits
    (a 1448-byte MSS per 1514-byte frame with TCP timestamps; tbf and real links count frames).

TCP slow start is not modelled here: ASTRA's messages (about 1.3 kB per layer) fit the initial
window of 10 segments; linkprobe.py measures where it matters (hundreds of kB and more).

Usage:
    python benchmarks/netns/corrected_link.py run --model ... (any `astra` command line)
or `import corrected_link; corrected_link.install()` before a Communicator is built.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FRAME_BYTES = 1514  # Ethernet frame of a full segment: 14 + 20 (IP) + 32 (TCP + timestamps) + 1448
MSS_BYTES = 1448
P2P_HEADER_BYTES = (4 + 2 + 8) * 8  # send_tensor's int64 header (astra.net.comm)

_installed = False


def wire_bits(num_bytes: float) -> float:
    """Bits a payload occupies on an Ethernet/IP/TCP link (full segments, headers included)."""
    return num_bytes * 8.0 * FRAME_BYTES / MSS_BYTES


def p2p_arrival_s(send_s: float, recv_posted_s: float, num_bytes: float, link) -> float:
    """When send_tensor's payload has arrived, gloo's receiver-driven rendezvous included."""
    lat = link.latency_ms * 1e-3
    ser = (
        0.0
        if math.isinf(link.bandwidth_mbps)
        else wire_bits(num_bytes + P2P_HEADER_BYTES) / (link.bandwidth_mbps * 1e6)
    )
    return max(send_s, recv_posted_s + lat) + 3 * lat + ser


def all_gather_arrival_s(send_s: float, num_bytes: float, world_size: int, link) -> float:
    """When a peer's all-gather slot has arrived: gloo's ring, one notification per step."""
    lat = link.latency_ms * 1e-3
    ser = (
        0.0
        if math.isinf(link.bandwidth_mbps)
        else wire_bits(num_bytes) / (link.bandwidth_mbps * 1e6)
    )
    return send_s + (world_size - 1) * (2 * lat + ser)


def install() -> None:
    """Patch this process's Uplink and Communicator with the corrected model (idempotent)."""
    global _installed
    if _installed:
        return
    from astra.net import comm as comm_mod
    from astra.net import link as link_mod

    original_arrival = link_mod.Uplink.arrival_s
    original_reserve = link_mod.Uplink.reserve
    original_recv = comm_mod.Communicator.recv_tensor

    def reserve(self, now_s: float, num_bytes_on_wire: float) -> float:
        return original_reserve(self, now_s, num_bytes_on_wire * FRAME_BYTES / MSS_BYTES)

    def arrival_s(self, send_s: float, num_bytes: float, op: str, world_size: int) -> float:
        if op == "p2p" and getattr(self, "_recv_posted_s", None) is not None:
            return p2p_arrival_s(send_s, self._recv_posted_s, num_bytes, self.link)
        if op == "all_gather":
            return all_gather_arrival_s(send_s, num_bytes, world_size, self.link)
        return original_arrival(self, send_s, num_bytes, op, world_size)

    def recv_tensor(self, src: int):
        self.uplink._recv_posted_s = time.time()  # r: when this receive was asked for
        try:
            return original_recv(self, src)
        finally:
            self.uplink._recv_posted_s = None

    link_mod.Uplink.reserve = reserve
    link_mod.Uplink.arrival_s = arrival_s
    comm_mod.Communicator.recv_tensor = recv_tensor
    _installed = True


def main(argv: list[str]) -> int:
    install()
    from astra.cli.main import main as astra_main

    return astra_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
