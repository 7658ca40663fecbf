"""One sequence-parallel forward pass on one rank (ASTRA or full-precision SP).

`build_rank_layout` decides what each rank holds from the same placement the simulation uses;
`sequence_parallel_forward` swaps each block's attention for a `RankAttention` and runs the
blocks on the local tokens. Class tokens follow the simulation (astra.parallel.simulate):
distributed replicas are local and never sent; a single class token lives on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from astra.parallel.codecs import CodesCodec, FloatCodec
from astra.parallel.placement import PlacementConfig, assign_tokens
from astra.parallel.runtime import RankAttention, RankLayout, resolve_exchange

if TYPE_CHECKING:
    from astra.net.protocol import Comm

SP_METHODS = {"astra": None, "sp-fp32": torch.float32, "sp-fp16": torch.float16}


@dataclass(frozen=True)
class SequenceLayout:
    """The whole (class-token-expanded) sequence: who holds each token, which are sent."""

    device_of_token: Tensor  # (T',) int64
    sendable: Tensor  # (T',) bool
    positions: Tensor  # (T',) absolute positions (class replicas share position 0)
    num_replicas: int  # leading class-token replicas (0 or N)


def build_sequence_layout(
    num_tokens: int, placement: PlacementConfig, class_tokens: str
) -> SequenceLayout:
    """Same rules as AstraModel._layout, for a sequence of `num_tokens` embedded tokens."""
    n = placement.num_devices
    positions = torch.arange(num_tokens)
    if class_tokens == "none":
        dev = assign_tokens(num_tokens, placement)
        return SequenceLayout(dev, torch.ones(num_tokens, dtype=torch.bool), positions, 0)
    content = assign_tokens(num_tokens - 1, placement)
    if class_tokens == "distributed" and n > 1:
        dev = torch.cat([torch.arange(n), content])
        sendable = torch.cat(
            [torch.zeros(n, dtype=torch.bool), torch.ones_like(content, dtype=torch.bool)]
        )
        pos = torch.cat([torch.zeros(n, dtype=torch.long), positions[1:]])
        return SequenceLayout(dev, sendable, pos, n)
    dev = torch.cat([content.new_zeros(1), content])
    return SequenceLayout(dev, torch.ones(num_tokens, dtype=torch.bool), positions, 0)


def build_rank_layout(seq: SequenceLayout, rank: int, world_size: int, causal: bool) -> RankLayout:
    local_index = torch.nonzero(seq.device_of_token == rank).flatten()
    send_local = torch.nonzero(seq.sendable[local_index]).flatten()
    send_positions, send_counts, last_positions, held_positions = [], [], [], []
    for j in range(world_size):
        held = seq.device_of_token == j
        sent = held & seq.sendable
        send_positions.append(seq.positions[sent])
        send_counts.append(int(sent.sum()))
        last_positions.append(int(seq.positions[held].max()) if held.any() else -1)
        held_positions.append(seq.positions[held].sort().values)
    return RankLayout(
        rank=rank,
        world_size=world_size,
        local_index=local_index,
        local_positions=seq.positions[local_index],
        send_local=send_local,
        send_counts=send_counts,
        send_positions=send_positions,
        causal=causal,
        last_positions=last_positions,
        held_positions=held_positions,
    )


def expand_class_tokens(x: Tensor, num_replicas: int) -> Tensor:
    """(B, 1+P, D) -> (B, N+P, D) with N replicas of the class token (paper §3.4)."""
    if num_replicas == 0:
        return x
    return torch.cat([x[:, :1].expand(-1, num_replicas, -1), x[:, 1:]], dim=1)


def install_rank_attention(
    model: nn.Module,
    codecs: list,
    layout: RankLayout,
    comm: Comm,
    overlap=True,
    loss=None,
    exchange: str = "auto",
):
    """Replace every block's attention with its per-rank version (in place, this rank only).

    exchange: "auto" (stream causal prefills, all-gather otherwise), "all-gather" or "stream";
    see astra.parallel.runtime.
    """
    for i, (block, codec) in enumerate(zip(model.blocks, codecs)):
        inner = getattr(block.attn, "inner", block.attn)  # unwrap a previous wrapper
        if hasattr(codec, "prepare"):
            codec.prepare(inner)
        block.attn = RankAttention(
            inner, codec, layout, comm, overlap=overlap, block=i, loss=loss, exchange=exchange
        )
    if resolve_exchange(exchange, layout.causal) == "stream":
        for j in model.blocks[0].attn.senders:  # the first block's codes find their receive posted
            comm.expect(j)


def sequence_parallel_forward(model: nn.Module, x_full: Tensor, layout: RankLayout) -> Tensor:
    """Embedded (expanded) sequence (1, T', D) -> this rank's last hidden states (1, T_local, D).

    Every rank embeds the whole input (a lookup or one patch convolution) and keeps its slice,
    so no input bytes cross the link either.
    """
    x = x_full[:, layout.local_index]
    for block in model.blocks:
        x = block(x, layout.local_positions, None)
    return x


def make_codecs(
    method: str, quantizers, use_tables: bool = False, search: str | None = None
) -> list:
    """One codec per block: ASTRA codes, or full-precision hidden states for Voltage-style SP.
    `search`: the senders' nearest-code search (GroupedCodebook.encode)."""
    if method not in SP_METHODS:
        raise ValueError(f"sequence-parallel method {method!r} is not one of {list(SP_METHODS)}")
    if method == "astra":
        return [CodesCodec(q, use_tables, search) for q in quantizers]
    return [FloatCodec(SP_METHODS[method]) for _ in quantizers]


def rank_forward(
    rank: int,
    world_size: int,
    comm,
    model: nn.Module,
    quantizers,
    x_full: Tensor,
    seq: SequenceLayout,
    method: str = "astra",
    overlap: bool = True,
    use_tables: bool = False,
    loss=None,
    exchange: str = "auto",
) -> Tensor:
    """This rank's part of one sequence-parallel pass; returns its last hidden states."""
    layout = build_rank_layout(seq, rank, world_size, getattr(model, "causal", False))
    codecs = make_codecs(method, quantizers, use_tables)
    install_rank_attention(model, codecs, layout, comm, overlap, loss=loss, exchange=exchange)
    out = sequence_parallel_forward(model, x_full, layout)
    comm.wait_sends()  # streamed codes must be delivered before the rank moves on
    return out
