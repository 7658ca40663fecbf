"""astra.net.packets: codes in MTU-sized packets, no retransmission, parity, interleaving."""

from __future__ import annotations

import pytest
import torch

from astra.net.link import LossModel
from astra.net.packets import (
    DATA,
    HEADER,
    PARITY,
    PacketChannel,
    PacketFormat,
    depacketize,
    frame,
    packetize,
    unframe,
)


def _codes(n=300, groups=4, bits=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, groups), generator=g)


@pytest.mark.parametrize("parity", [0, 1, 3])
def test_packets_fit_the_mtu_and_round_trip(parity):
    fmt = PacketFormat(mtu=200, parity_every=parity)
    codes = _codes()
    packets = packetize(codes, 10, block=7, sender=2, fmt=fmt)
    assert max(len(p) for p in packets) <= 200
    data = [p for p in packets if HEADER.unpack_from(p)[5] == DATA]
    assert len(data) == fmt.data_packets(300, 40)  # 40 bits per token: 37 tokens per packet
    assert all(HEADER.unpack_from(p)[:2] == (7, 2) for p in packets)
    assert sum(len(p) for p in packets) == fmt.wire_bytes(300, 40)
    assert unframe(frame(packets)) == packets
    back, kept = depacketize(packets, 300, 4, 10, fmt)
    assert kept.all() and torch.equal(back, codes)


def test_a_lost_packet_thins_the_tokens_evenly():
    fmt = PacketFormat(mtu=200, parity_every=0)
    codes = _codes()
    packets = packetize(codes, 10, 0, 0, fmt)
    num_data = len(packets)
    _, kept = depacketize(packets[:3] + packets[4:], 300, 4, 10, fmt)
    assert torch.equal(torch.nonzero(~kept).flatten(), torch.arange(3, 300, num_data))


@pytest.mark.parametrize("parity", [1, 3])
def test_parity_rebuilds_any_one_lost_packet_of_its_group(parity):
    fmt = PacketFormat(mtu=200, parity_every=parity)
    codes = _codes()
    packets = packetize(codes, 10, 0, 0, fmt)
    for lost in range(len(packets)):
        back, kept = depacketize(packets[:lost] + packets[lost + 1 :], 300, 4, 10, fmt)
        assert kept.all() and torch.equal(back, codes), lost
    data = [p for p in packets if HEADER.unpack_from(p)[5] == DATA]
    parities = [p for p in packets if HEADER.unpack_from(p)[5] == PARITY]
    # two data packets of one group lost: parity cannot rebuild either
    if parity > 1:
        _, kept = depacketize(data[2:] + parities, 300, 4, 10, fmt)
        assert not kept[0] and not kept[1] and kept[2:].sum() > 0


@pytest.mark.parametrize("parity", [0, 1, 2])
def test_the_receiver_and_the_prediction_agree_packet_for_packet(parity):
    """What the runtime rebuilds from real packets = what the simulation predicts (same keys)."""
    channel = PacketChannel(LossModel(0.2, seed=5), PacketFormat(mtu=120, parity_every=parity))
    codes = _codes(n=250)
    total_lost = 0
    for block in range(6):
        for sender, receiver in [(0, 1), (1, 0), (2, 1)]:
            wire = channel.send(codes, 10, block, sender)
            got, kept = channel.receive(wire, 250, 4, 10, block, sender, receiver)
            predicted = channel.kept_tokens(250, 40, block, sender, receiver)
            assert torch.equal(kept, predicted), (block, sender, receiver)
            assert torch.equal(got[kept], codes[kept])
            total_lost += int((~kept).sum())
    assert total_lost > 0  # 20 % packet loss loses something over 18 messages


def test_parity_lowers_the_tokens_lost():
    def lost_fraction(parity):
        channel = PacketChannel(LossModel(0.05, seed=1), PacketFormat(parity_every=parity))
        kept = [channel.kept_tokens(512, 20, b, 0, 1) for b in range(400)]
        return 1 - torch.stack(kept).float().mean().item()

    # one 1280-byte packet per message at 20 bits per token: lose it, lose everything
    assert 0.03 < lost_fraction(0) < 0.07
    assert lost_fraction(1) < 0.01  # lost only if the packet and its copy both are


def test_floats_span_packets_and_are_lost_with_any_of_them():
    channel = PacketChannel(LossModel(0.1, seed=2), PacketFormat(parity_every=0))
    item_bits = 576 * 32  # one fp32 hidden state: 2304 bytes, two packets
    assert channel.format.data_packets(10, item_bits) == 20
    kept = torch.stack([channel.kept_tokens(10, item_bits, b, 0, 1) for b in range(300)])
    lost = 1 - kept.float().mean().item()
    assert 0.14 < lost < 0.24  # 1 - 0.9^2 = 0.19


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="mtu must be in"):
        PacketFormat(mtu=10)
    with pytest.raises(ValueError, match="do not fit one 20-byte packet"):
        packetize(_codes(n=4, groups=8), 10, 0, 0, PacketFormat(mtu=20))
