"""Link model: bandwidth, latency and loss of the (weak) network between devices.

Pure timing and loss arithmetic with no torch.distributed; the communicator (comm.py) uses it to
emulate a slow link on top of a fast one (loopback), the way the paper does (sleep for
transmitted_size / bandwidth, paper notes section 4), plus a one-way latency.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

_BANDWIDTH_EXAMPLES = '"10mbit", "10Mbps", "1gbit", "500kbit", "2.5mbps", "inf"'
_LATENCY_EXAMPLES = '"20ms", "0.5s", "250us", "0"'

# unit -> megabits per second per unit; bits ("mbit", "mbps") and bytes ("MBps", "MB/s") both work
_BANDWIDTH_UNITS = {
    "bit": 1e-6,
    "bps": 1e-6,
    "b/s": 1e-6,
    "kbit": 1e-3,
    "kbps": 1e-3,
    "kb/s": 1e-3,
    "mbit": 1.0,
    "mbps": 1.0,
    "mb/s": 1.0,
    "gbit": 1e3,
    "gbps": 1e3,
    "gb/s": 1e3,
}
_BYTE_UNITS = {"kbyteps": 8e-3, "mbyteps": 8.0, "gbyteps": 8e3}
_LATENCY_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "": None}
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def parse_bandwidth(text: str) -> float:
    """Parse a tc-style rate into Mbit/s: "10mbit" -> 10.0, "1gbit" -> 1000.0, "inf" -> math.inf.

    Units are case-insensitive and mean bits ("10Mbps" = "10mbit"), except the byte forms
    "MBps"/"MB/s" with a capital B, which are megabytes per second.
    """
    s = str(text).strip()
    if s.lower() in ("inf", "unlimited", "none"):
        return math.inf
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z/]+)", s)
    if m is not None:
        value, unit = float(m.group(1)), m.group(2)
        # A capital B right after the prefix means bytes ("MBps", "MB/s"); "Mbps"/"mbit" are bits.
        if len(unit) >= 2 and unit[1] == "B" and unit[0] in "kKmMgG" and unit[2:] in ("ps", "/s"):
            mbps = value * _BYTE_UNITS[unit[0].lower() + "byteps"]
        elif unit.lower() in _BANDWIDTH_UNITS:
            mbps = value * _BANDWIDTH_UNITS[unit.lower()]
        else:
            mbps = -1.0
        if mbps > 0:
            return mbps
    raise ValueError(
        f"bad bandwidth {text!r}: expected a positive number with a unit, "
        f"e.g. {_BANDWIDTH_EXAMPLES}"
    )


def parse_latency(text: str) -> float:
    """Parse a one-way latency into milliseconds: "20ms" -> 20.0, "0.5s" -> 500.0, "0" -> 0.0.

    A bare number is accepted only for zero; any other value needs a unit.
    """
    s = str(text).strip()
    m = re.fullmatch(_NUMBER + r"\s*(us|ms|s|)", s.lower())
    if m is not None:
        value, unit = float(m.group(1)), m.group(2)
        if unit:
            return value * _LATENCY_UNITS[unit]
        if value == 0.0:
            return 0.0
    raise ValueError(
        f"bad latency {text!r}: expected a non-negative number with a unit, "
        f"e.g. {_LATENCY_EXAMPLES}"
    )


@dataclass(frozen=True)
class LinkConfig:
    """One device's link to its peers.

    Cost model: an all-gather is N-1 unicasts, each device sending its whole payload to every peer
    over its own uplink, one after another. TCP all-gather over Wi-Fi has no broadcast, so this is
    what a real deployment pays; it is conservative (no multicast, no tree) and, above all, the
    same for every method compared (ASTRA, SP, TP, pipeline), so ratios between them are fair.
    Downlinks are assumed not to be the bottleneck, and latency is paid once per message (the
    unicasts to different peers are pipelined, their propagation delays overlap).
    """

    bandwidth_mbps: float = math.inf  # uplink rate of each device, Mbit/s; math.inf = unlimited
    latency_ms: float = 0.0  # one-way propagation delay per message, ms
    loss_rate: float = 0.0  # probability that a packet is lost, 0..1 (astra.net.packets)
    topology: str = "star"  # free-text note recorded with results (e.g. "wifi-ap", "ethernet")
    # on a lossy link: one XOR parity packet per this many data packets (0: none)
    loss_parity: int = 1

    def __post_init__(self) -> None:
        if not (self.bandwidth_mbps > 0):  # also rejects NaN
            raise ValueError(f"bandwidth_mbps must be > 0 (or math.inf), got {self.bandwidth_mbps}")
        if not (self.latency_ms >= 0) or math.isinf(self.latency_ms):
            raise ValueError(f"latency_ms must be finite and >= 0, got {self.latency_ms}")
        if not (0.0 <= self.loss_rate <= 1.0):
            raise ValueError(f"loss_rate must be in [0, 1], got {self.loss_rate}")
        if self.loss_parity < 0:
            raise ValueError(f"loss_parity must be >= 0, got {self.loss_parity}")

    @classmethod
    def from_strings(
        cls, bandwidth: str, latency: str = "0", loss_rate: float = 0.0, topology: str = "star"
    ) -> LinkConfig:
        """Build from CLI-style strings: LinkConfig.from_strings("10mbit", "20ms")."""
        return cls(parse_bandwidth(bandwidth), parse_latency(latency), loss_rate, topology)

    @property
    def is_ideal(self) -> bool:
        """True when the link adds no time at all (unlimited bandwidth and zero latency)."""
        return math.isinf(self.bandwidth_mbps) and self.latency_ms == 0.0

    def serialization_time_s(self, num_bytes: float, num_peers: int = 1) -> float:
        """Time the uplink is busy pushing num_bytes to each of num_peers peers, in seconds."""
        if math.isinf(self.bandwidth_mbps):
            return 0.0
        return num_peers * num_bytes * 8.0 / (self.bandwidth_mbps * 1e6)

    def transfer_time_s(self, num_bytes: float, num_peers: int = 1) -> float:
        """Seconds until the last of num_peers unicasts of num_bytes has arrived.

        latency + num_peers * num_bytes * 8 / bandwidth (see the class docstring for the model).
        An all-gather among N devices uses num_peers = N - 1; a point-to-point send uses 1.
        """
        if num_bytes < 0 or num_peers < 0:
            raise ValueError(f"num_bytes and num_peers must be >= 0, got {num_bytes}, {num_peers}")
        if num_peers == 0:
            return 0.0
        return self.latency_ms * 1e-3 + self.serialization_time_s(num_bytes, num_peers)

    def ring_all_reduce_time_s(self, num_bytes: float, world_size: int) -> float:
        """Ring all-reduce of num_bytes per device: 2(N-1) steps, each one unicast of bytes/N.

        This is what a tensor-parallel deployment would run (Megatron over NCCL/gloo rings): each
        device sends 2(N-1)/N * num_bytes in total and pays the latency 2(N-1) times.
        """
        if world_size <= 1:
            return 0.0
        steps = 2 * (world_size - 1)
        return steps * self.transfer_time_s(num_bytes / world_size, 1)


class Uplink:
    """One device's emulated uplink: the link model both communicators share (real processes,
    astra.net.comm; the composed mode, astra.net.lockstep), so the two cannot drift apart.

    Messages queue behind each other on the uplink (`reserve`), then each reaches its peers at
    start + latency + peers * bytes * 8 / bandwidth (`arrival_s`; LinkConfig's model). Times are
    seconds on whatever clock the caller keeps: wall time for real processes, virtual time in
    the composed mode. `link` may change between requests (a bandwidth trace); the queue stays.
    """

    def __init__(self, link: LinkConfig) -> None:
        self.link = link
        self.free_s = 0.0  # when everything queued so far has left the uplink

    def reserve(self, now_s: float, num_bytes_on_wire: float) -> float:
        """Queue num_bytes_on_wire (already multiplied by the number of unicasts); returns the
        moment the uplink starts pushing them."""
        start = max(now_s, self.free_s)
        self.free_s = start + self.link.serialization_time_s(num_bytes_on_wire, 1)
        return start

    def arrival_s(self, send_s: float, num_bytes: float, op: str, world_size: int) -> float:
        """When a message of num_bytes sent at send_s has arrived everywhere it goes:
        op "all_gather" (N-1 unicasts), "all_reduce" (a ring) or "p2p" (one peer)."""
        if op == "all_reduce":
            return send_s + self.link.ring_all_reduce_time_s(num_bytes, world_size)
        peers = world_size - 1 if op == "all_gather" else 1
        return send_s + self.link.transfer_time_s(num_bytes, peers)


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, identical in every process (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LossModel:
    """Deterministic random loss: which messages, or which tokens of a message, are dropped.

    Decisions depend only on (seed, key), never on call order, so every rank reaches the same
    verdict for the same key (e.g. key = (layer, step, src_rank, dst_rank)) without communicating.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not (0.0 <= rate <= 1.0):
            raise ValueError(f"loss rate must be in [0, 1], got {rate}")
        self.rate = float(rate)
        self.seed = int(seed)

    def _generator(self, key: tuple) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(_derive_seed(self.seed, *key))
        return g

    def message_dropped(self, *key: object) -> bool:
        """True if the whole message identified by key is lost."""
        if self.rate == 0.0:
            return False
        return bool(torch.rand((), generator=self._generator(("msg", *key))) < self.rate)

    def dropped_mask(self, num_items: int, *key: object) -> torch.Tensor:
        """Bool (num_items,): True for each item (token) of the message key that is lost."""
        if self.rate == 0.0:
            return torch.zeros(num_items, dtype=torch.bool)
        return torch.rand(num_items, generator=self._generator(("items", *key))) < self.rate

    def __repr__(self) -> str:
        return f"LossModel(rate={self.rate}, seed={self.seed})"
