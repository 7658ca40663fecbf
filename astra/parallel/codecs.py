"""What one device sends per block about its tokens, and how receivers rebuild keys/values.

- `CodesCodec`: ASTRA. Bit-packed VQ codes, G·log2K bits per token per codebook (paper §3.2).
- `FloatCodec`: full-precision sequence parallelism (Voltage): the attention input in fp32/fp16.

Both take the sending device's attention inputs and give the receiver (k, v) before RoPE, so the
runtime's attention code is one piece whatever crosses the wire.
"""

from __future__ import annotations

import torch
from torch import Tensor

from astra.models.attention import Attention
from astra.parallel.quantizer import BlockQuantizer
from astra.vq import pack_codes, table_sum, unpack_codes


class CodesCodec:
    """ASTRA codes. With `use_tables`, the "hidden" point rebuilds K/V with per-code projection
    tables (G, K, Dkv) instead of decode-then-project: a lookup and a sum over groups instead of
    a (D x 2 Dkv) matmul per remote token. Only worth it, and only built, when G*K*Dkv is small."""

    def __init__(
        self,
        quantizer: BlockQuantizer,
        use_tables: bool = False,
        search: str | None = None,
    ):
        self.quantizer = quantizer
        self.search = search  # the sender's nearest-code search (None: by x's dtype)
        for codebook in quantizer.codebooks:
            codebook.prepare_search_(search)
        self.bits = quantizer.codebooks[0].config.bits_per_code
        self.groups = quantizer.num_groups_on_wire
        self.tables: tuple[Tensor, Tensor] | None = None
        self.use_tables = use_tables and quantizer.point == "hidden"
        self.needs_kv = quantizer.point == "kv"  # encode from the projected k, v

    def encode_codes(self, attn: Attention, x: Tensor, kv=None) -> Tensor:
        """The sender's codes (n, G_wire), before packing (packets pack their own slices)."""
        return self.quantizer.encode(attn, x, kv, self.search)[0]  # (1, n, G) -> (n, G)

    def encode(self, attn: Attention, x: Tensor, kv=None) -> Tensor:
        return pack_codes(self.encode_codes(attn, x, kv), self.bits)

    def payload_bytes(self, num_tokens: int) -> int:
        return (num_tokens * self.groups * self.bits + 7) // 8

    def receive(self, payload: Tensor, num_tokens: int) -> Tensor:
        """Wire bytes -> codes (1, n, G_wire): what a receiver keeps (App. G: 10 bits/code)."""
        return unpack_codes(payload, num_tokens, self.groups, self.bits)[None]

    @staticmethod
    def distinct(codes: Tensor) -> tuple[Tensor, Tensor]:
        """codes (1, n, G_wire) -> each distinct row once (1, U, G_wire) and how many of the n
        tokens carry it (U,) float32. Tokens with the same codes have the same rebuilt k and v
        (before RoPE), so attention needs each once, its score raised by log(count): a
        device's remote tokens carry far fewer distinct codes than tokens (DINOv2-S, 512
        remote tokens at K=1024: 68-220 per block)."""
        rows = codes[0]  # (n, G)
        if rows.shape[1] == 1:  # one group: unique values, the common and fastest case
            unique, counts = torch.unique(rows[:, 0], return_counts=True)
            unique = unique[:, None]  # (U,) -> (U, 1)
        else:
            unique, counts = torch.unique(rows, dim=0, return_counts=True)  # (U, G)
        return unique[None], counts.to(torch.float32)

    def rebuild_kv(self, attn: Attention, codes: Tensor) -> tuple[Tensor, Tensor]:
        """codes (1, n, G_wire) -> (k, v) (1, Hkv, n, hd) before RoPE."""
        if self.use_tables:
            return self._lookup_kv(attn, codes)
        return self.quantizer.decode_kv(attn, codes)

    def decode_kv(self, attn: Attention, payload: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        return self.rebuild_kv(attn, self.receive(payload, num_tokens))

    def prepare(self, attn: Attention) -> None:
        """Build the per-code projection tables once, when the model is set up (not per pass)."""
        if self.use_tables and self.tables is None:
            codebook = self.quantizer.codebooks[0]
            self.tables = (
                codebook.lookup_table(attn.k_proj.weight, attn.k_proj.bias),
                codebook.lookup_table(attn.v_proj.weight, attn.v_proj.bias),
            )

    def _lookup_kv(self, attn: Attention, codes: Tensor) -> tuple[Tensor, Tensor]:
        self.prepare(attn)
        k = table_sum(self.tables[0], codes)  # (1, n, Dkv)
        v = table_sum(self.tables[1], codes)
        return _split_heads(k, attn.num_kv_heads), _split_heads(v, attn.num_kv_heads)


class FloatCodec:
    """Voltage-style sequence parallelism: the attention input itself, fp32 or fp16."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"FloatCodec dtype must be float32, float16 or bfloat16, got {dtype}")
        self.dtype = dtype

    def encode(self, attn: Attention, x: Tensor, kv=None) -> Tensor:
        return x[0].to(self.dtype).contiguous().view(torch.uint8).flatten()

    def payload_bytes(self, num_tokens: int, width: int) -> int:
        return num_tokens * width * torch.finfo(self.dtype).bits // 8

    def receive(self, payload: Tensor, num_tokens: int) -> Tensor:
        return payload.view(self.dtype).view(1, num_tokens, -1)  # (1, n, D) in the wire dtype

    def rebuild_kv(self, attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
        return attn.project_kv(x.to(attn.dtype))  # wire dtype -> model dtype

    def decode_kv(self, attn: Attention, payload: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
        return self.rebuild_kv(attn, self.receive(payload, num_tokens))


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    b, n, width = t.shape
    return t.view(b, n, num_heads, width // num_heads).transpose(1, 2)  # -> (B, H, n, hd)
