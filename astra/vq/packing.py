"""Bit-packing of codebook codes for the wire: exactly ceil(N * G * bits / 8) bytes.

ASTRA §3.2 counts G * log2 K bits per token; byte-aligned int16 codes would cost 1.6x that for
K=1024. Layout (little-endian bit order, LSB first at both levels):

- codes are taken in row-major order, flat index i = token * G + group;
- bit j of code i (j = 0 is the least significant) is stream bit p = i * bits + j;
- stream bit p is bit (p % 8) of byte p // 8 (bit 0 = least significant);
- the unused high bits of the last byte are zero.

So with bits=10, byte 0 holds bits 0..7 of code 0 and byte 1 holds its bits 8..9 in its two
lowest bits, followed by bits 0..5 of code 1. Both directions are vectorised over all codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MAX_BITS", "pack_codes", "packed_num_bytes", "unpack_codes"]

MAX_BITS = 16  # K <= 65536; larger per-group codebooks are not a meaningful VQ setting here


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got bits={bits!r}")


def packed_num_bytes(num_tokens: int, num_groups: int, bits: int) -> int:
    """Payload size in bytes: ceil(num_tokens * num_groups * bits / 8)."""
    _check_bits(bits)
    if num_tokens < 0 or num_groups < 1:
        raise ValueError(
            f"need num_tokens >= 0 and num_groups >= 1, got num_tokens={num_tokens}, "
            f"num_groups={num_groups}"
        )
    return (num_tokens * num_groups * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes (N, G) integer in [0, 2^bits) -> uint8 (ceil(N*G*bits/8),) on codes' device.

    The range check reads the max back to the host (one sync): cheap next to a network send,
    and it stops a code that does not fit from silently corrupting its neighbours.
    """
    _check_bits(bits)
    if (
        codes.dim() != 2
        or codes.is_floating_point()
        or codes.is_complex()
        or (codes.dtype == torch.bool)
    ):
        raise ValueError(
            f"codes must be an integer (N, G) tensor, got {codes.dtype} {tuple(codes.shape)}"
        )
    num_tokens, num_groups = codes.shape
    num_bytes = packed_num_bytes(num_tokens, num_groups, bits)
    if codes.numel() == 0:
        return torch.zeros(num_bytes, dtype=torch.uint8, device=codes.device)
    flat = codes.reshape(-1).long()  # (N*G,) row-major: token-major, then group
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        bad = hi if hi >= 1 << bits else lo
        raise ValueError(
            f"code value {bad} does not fit in bits={bits} (valid range [0, {(1 << bits) - 1}]); "
            f"codes span [{lo}, {hi}]"
        )
    shifts = torch.arange(bits, device=codes.device)  # (bits,)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # (N*G*bits,) LSB 1st
    pad = num_bytes * 8 - stream.numel()
    stream = torch.cat([stream, stream.new_zeros(pad)])  # (num_bytes*8,)
    weights = (1 << torch.arange(8, device=codes.device)).to(torch.uint8)  # (8,) bit p%8 -> value
    # (num_bytes*8,) -> (num_bytes, 8); the weighted sum of distinct bits is <= 255, no overflow
    return (stream.reshape(num_bytes, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_codes(buf: Tensor, num_tokens: int, num_groups: int, bits: int) -> Tensor:
    """uint8 buffer from pack_codes -> codes (num_tokens, num_groups) int64 on buf's device."""
    num_bytes = packed_num_bytes(num_tokens, num_groups, bits)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != num_bytes:
        raise ValueError(
            f"expected a uint8 buffer of {num_bytes} bytes for num_tokens={num_tokens}, "
            f"num_groups={num_groups}, bits={bits}; got {buf.dtype} {tuple(buf.shape)}"
        )
    count = num_tokens * num_groups
    if count == 0:
        return torch.zeros(num_tokens, num_groups, dtype=torch.long, device=buf.device)
    shifts8 = torch.arange(8, device=buf.device)  # (8,)
    stream = ((buf.long().unsqueeze(1) >> shifts8) & 1).reshape(-1)  # (num_bytes*8,) LSB first
    code_bits = stream[: count * bits].reshape(count, bits)  # (N*G*bits,) -> (N*G, bits)
    shifts = torch.arange(bits, device=buf.device)  # (bits,)
    codes = (code_bits << shifts).sum(dim=1)  # (N*G,) int64
    return codes.reshape(num_tokens, num_groups)  # (N*G,) -> (N, G)
