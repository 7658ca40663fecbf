"""Codes in packets: at most one MTU each, never retransmitted; receivers keep what arrived.

With `--loss`, a device's codes for one block travel as datagram-sized packets, the way a UDP
transport would carry them: a 13-byte header naming the block, the sender, the packet's index,
how many data packets the message has and how many tokens it covers, then a bit-packed slice of
codes. Nothing is retransmitted: the network (astra.net.link.LossModel, deterministic so every
process agrees) drops whole packets, and the receiver attends to the tokens whose packets
arrived. The packets are real bytes, built and parsed here; over gloo they ride inside one
TCP message (framed with a 2-byte length each), which stands in for the datagrams.

Two choices keep a lost packet cheap (paper Table 11 reports +0.1 % perplexity at 5 % loss):
- Interleaving: packet p of P carries tokens p, p+P, p+2P, ... so a lost packet thins the
  sender's tokens evenly instead of blinding the receiver to one stretch of text.
- Parity (`parity_every=k`): after every k data packets one packet carries their XOR; any single
  lost packet of those k+1 is rebuilt from the others. k=1 sends every packet twice.

Full-precision payloads (sequence parallelism's floats) do not fit one token to a packet: a
token then spans several packets and is lost with any of them (`PacketChannel.kept_tokens`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch
from torch import Tensor

from astra.net.link import LinkConfig, LossModel
from astra.vq.packing import pack_codes, packed_num_bytes, unpack_codes

HEADER = struct.Struct("!HHHHIB")  # block, sender, index, data packets, tokens, kind
DATA, PARITY = 0, 1
UDP_PAYLOAD = 1472  # a 1500-byte Ethernet frame less the IPv4 (20) and UDP (8) headers
_FRAME = struct.Struct("!H")


@dataclass(frozen=True)
class PacketFormat:
    mtu: int = UDP_PAYLOAD  # bytes per packet, header included
    parity_every: int = 1  # one XOR parity packet per this many data packets (0: none)

    def __post_init__(self) -> None:
        if not HEADER.size < self.mtu <= 65507:
            raise ValueError(f"mtu must be in ({HEADER.size}, 65507] bytes, got {self.mtu}")
        if self.parity_every < 0:
            raise ValueError(f"parity_every must be >= 0, got {self.parity_every}")

    @property
    def payload_bits(self) -> int:
        return (self.mtu - HEADER.size) * 8

    def tokens_per_packet(self, item_bits: int) -> int:
        """Whole tokens one packet carries (0: a token spans several packets)."""
        return self.payload_bits // item_bits

    def data_packets(self, num_tokens: int, item_bits: int) -> int:
        per = self.tokens_per_packet(item_bits)
        if per == 0:
            return num_tokens * math.ceil(item_bits / self.payload_bits)
        return math.ceil(num_tokens / per)

    def parity_groups(self, num_data: int) -> list[range]:
        """The data packets each parity packet covers (none without parity)."""
        if self.parity_every == 0 or num_data == 0:
            return []
        k = self.parity_every
        return [range(s, min(s + k, num_data)) for s in range(0, num_data, k)]

    def wire_bytes(self, num_tokens: int, item_bits: int) -> int:
        """Bytes on the wire for one message: headers, payloads and parity."""
        per = self.tokens_per_packet(item_bits)
        if per == 0:  # floats: no parity, each token cut into MTU-sized pieces
            return num_tokens * (item_bits // 8 + self.data_packets(1, item_bits) * HEADER.size)
        num_data = self.data_packets(num_tokens, item_bits)
        sizes = [_slice_bytes(num_tokens, num_data, p, item_bits) for p in range(num_data)]
        total = num_data * HEADER.size + sum(sizes)
        for group in self.parity_groups(num_data):
            total += HEADER.size + max(sizes[p] for p in group)
        return total


def input_seed(row: Tensor) -> int:
    """A loss seed from one request's input (its token ids or pixels): every request meets its
    own losses, and the simulation and every process of the runtime, which all hold the same
    input, meet the same ones."""
    data = row.detach().cpu().contiguous()
    digest = hashlib.blake2b(str(data.dtype).encode() + data.numpy().tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def request_seed(inputs: dict) -> int:
    """input_seed of a one-request input dict ({"input_ids": (1, T)} or {"pixels": ...})."""
    return input_seed(inputs["input_ids" if "input_ids" in inputs else "pixels"][0])


def _slice_bytes(num_tokens: int, num_data: int, index: int, item_bits: int) -> int:
    count = len(range(index, num_tokens, num_data))  # interleaved: tokens index, index+P, ...
    return (count * item_bits + 7) // 8


def packetize(codes: Tensor, bits: int, block: int, sender: int, fmt: PacketFormat) -> list[bytes]:
    """codes (n, G) -> the message's packets: interleaved data packets, then parity packets."""
    num_tokens, groups = codes.shape
    item_bits = groups * bits
    if fmt.tokens_per_packet(item_bits) == 0:
        raise ValueError(f"a token's codes ({item_bits} bits) do not fit one {fmt.mtu}-byte packet")
    num_data = fmt.data_packets(num_tokens, item_bits)
    packets, payloads = [], []
    for p in range(num_data):
        payload = pack_codes(codes[p::num_data], bits).numpy().tobytes()  # tokens p, p+P, ...
        payloads.append(payload)
        packets.append(HEADER.pack(block, sender, p, num_data, num_tokens, DATA) + payload)
    for g, group in enumerate(fmt.parity_groups(num_data)):
        width = max(len(payloads[p]) for p in group)
        parity = bytes(width)
        for p in group:
            parity = _xor(parity, payloads[p])
        packets.append(HEADER.pack(block, sender, g, num_data, num_tokens, PARITY) + parity)
    return packets


def depacketize(
    packets: list[bytes], num_tokens: int, groups: int, bits: int, fmt: PacketFormat
) -> tuple[Tensor, Tensor]:
    """The packets that arrived -> (codes (n, G) with zeros where lost, kept (n,) bool).
    A lost data packet is rebuilt when the rest of its parity group and its parity arrived."""
    item_bits = groups * bits
    num_data = fmt.data_packets(num_tokens, item_bits)
    data: dict[int, bytes] = {}
    parity: dict[int, bytes] = {}
    for packet in packets:
        _, _, index, total, tokens, kind = HEADER.unpack_from(packet)
        if total != num_data or tokens != num_tokens:
            raise ValueError(
                f"packet says {total} packets / {tokens} tokens, expected {num_data} / "
                f"{num_tokens}: sender and receiver disagree on the message"
            )
        (data if kind == DATA else parity)[index] = packet[HEADER.size :]
    for g, group in enumerate(fmt.parity_groups(num_data)):
        missing = [p for p in group if p not in data]
        if len(missing) == 1 and g in parity:
            rebuilt = parity[g]
            for p in group:
                if p in data:
                    rebuilt = _xor(rebuilt, data[p])
            p = missing[0]
            data[p] = rebuilt[: _slice_bytes(num_tokens, num_data, p, item_bits)]
    codes = torch.zeros(num_tokens, groups, dtype=torch.long)
    kept = torch.zeros(num_tokens, dtype=torch.bool)
    for p, payload in data.items():
        count = len(range(p, num_tokens, num_data))
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        assert buf.numel() == packed_num_bytes(count, groups, bits)
        codes[p::num_data] = unpack_codes(buf, count, groups, bits)
        kept[p::num_data] = True
    return codes, kept


def frame(packets: list[bytes]) -> Tensor:
    """Packets -> one uint8 buffer (each prefixed by its length), for a stream transport."""
    return torch.frombuffer(
        bytearray(b"".join(_FRAME.pack(len(p)) + p for p in packets)), dtype=torch.uint8
    )


def unframe(buffer: Tensor) -> list[bytes]:
    raw = buffer.numpy().tobytes()
    packets, at = [], 0
    while at < len(raw):
        (size,) = _FRAME.unpack_from(raw, at)
        packets.append(raw[at + _FRAME.size : at + _FRAME.size + size])
        at += _FRAME.size + size
    return packets


def _xor(a: bytes, b: bytes) -> bytes:
    n = max(len(a), len(b))
    x = int.from_bytes(a.ljust(n, b"\0"), "big") ^ int.from_bytes(b.ljust(n, b"\0"), "big")
    return x.to_bytes(n, "big")


class PacketChannel:
    """The lossy link between devices: which packets of a block's message reach a receiver.

    Decisions are keyed by (block, sender, receiver, packet kind, index), so the sender's
    process, the receiver's process and the single-process simulation agree without talking.
    """

    def __init__(self, loss: LossModel, fmt: PacketFormat | None = None) -> None:
        self.loss = loss
        self.format = fmt or PacketFormat()

    @classmethod
    def for_link(cls, link: LinkConfig, seed: int = 0) -> PacketChannel | None:
        """The channel of a lossy link (None for a reliable one: codes go as one message)."""
        if link.loss_rate == 0:
            return None
        return cls(LossModel(link.loss_rate, seed), PacketFormat(parity_every=link.loss_parity))

    def reseeded(self, seed: int) -> PacketChannel:
        """The same link for another request: its own losses (see input_seed)."""
        return PacketChannel(LossModel(self.loss.rate, seed), self.format)

    @property
    def rate(self) -> float:
        return self.loss.rate

    def arrives(self, block: int, sender: int, receiver: int, kind: int, index: int) -> bool:
        return not self.loss.message_dropped(block, sender, receiver, kind, index)

    def send(self, codes: Tensor, bits: int, block: int, sender: int) -> Tensor:
        """The sender's side: its codes (n, G) as framed packets."""
        return frame(packetize(codes, bits, block, sender, self.format))

    def receive(
        self, buffer: Tensor, num_tokens: int, groups: int, bits: int, block: int, sender: int,
        receiver: int,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """The receiver's side: drop what the network drops, rebuild from what arrived."""
        arrived = []
        for packet in unframe(buffer):
            b, s, index, _, _, kind = HEADER.unpack_from(packet)
            if (b, s) != (block, sender):
                raise ValueError(f"packet of block {b} from {s} in block {block} from {sender}")
            if self.arrives(block, sender, receiver, kind, index):
                arrived.append(packet)
        return depacketize(arrived, num_tokens, groups, bits, self.format)

    def kept_tokens(
        self, num_tokens: int, item_bits: int, block: int, sender: int, receiver: int
    ) -> Tensor:
        """Bool (n,): the tokens whose packets arrived (or were rebuilt), without building
        the bytes. Equals `receive`'s kept for codes; also covers floats (a token spans
        several packets and is lost with any of them)."""
        fmt = self.format
        num_data = fmt.data_packets(num_tokens, item_bits)
        got = [self.arrives(block, sender, receiver, DATA, p) for p in range(num_data)]
        if fmt.tokens_per_packet(item_bits) == 0:
            span = num_data // max(num_tokens, 1)  # packets per token
            return torch.tensor(
                [all(got[t * span : (t + 1) * span]) for t in range(num_tokens)], dtype=torch.bool
            )
        for g, group in enumerate(fmt.parity_groups(num_data)):
            missing = [p for p in group if not got[p]]
            if len(missing) == 1 and self.arrives(block, sender, receiver, PARITY, g):
                got[missing[0]] = True
        kept = torch.zeros(num_tokens, dtype=torch.bool)
        for p in range(num_data):
            kept[p::num_data] = got[p]
        return kept
