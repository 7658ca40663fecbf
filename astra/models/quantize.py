"""Weight-only quantization of a model's blocks: 8-bit per output channel or 4-bit per group,
through torch's own CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

Orthogonal to ASTRA (the paper's Table 5 combines them): ASTRA quantizes what travels between
devices, this quantizes what each device stores. Activations enter the kernels in bfloat16.

Where the kernels win is decoding: one token reads every weight once, so 4x or 8x fewer bytes
per weight is the speed-up. For many tokens at once (a prefill) these kernels are slower than a
dense bf16 matmul on this CPU (measured: 1024 x 576 -> 1536, one thread: bf16 1.5 ms, int8
22 ms, int4 20 ms), so above `DENSE_ROWS` rows the weight is dequantized to bf16 on the fly
and multiplied densely: the prefill keeps its speed, the weights stay small in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BITS = (8, 4)
# how a device stores its blocks' weights: the user's --weights choice -> bits (None: as loaded)
WEIGHTS = {"full": None, "int8": 8, "int4": 4}
DENSE_ROWS = 32  # more rows than this: dequantize and use a dense matmul


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored in `bits` (8: symmetric per output channel; 4: asymmetric
    per `group_size` inputs, gpt-fast's layout). Same call and attributes as nn.Linear."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 64):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"weight bits must be one of {BITS}, got {bits}")
        w = linear.weight.detach().float()  # (out, in)
        self.out_features, self.in_features = w.shape
        self.compute_dtype = linear.weight.dtype  # what the model computes in around it
        self.bits, self.group_size = bits, group_size
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        if bits == 8:
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)  # (out,)
            self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
        else:
            if self.in_features % group_size:
                raise ValueError(
                    f"4-bit weights need in_features ({self.in_features}) divisible by the "
                    f"group size {group_size}"
                )
            groups = w.reshape(self.out_features, -1, group_size)  # (out, in/gs, gs)
            lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32)
            zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
            q = q.reshape(self.out_features, self.in_features)  # (out, in) in [0, 15]
            # the kernel's own layout (N, K/2) uint8 is the only copy kept: half a byte a weight
            self.register_buffer(
                "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            )
            # (in/gs, out, 2): per group and output, scale and zero, as the kernel reads them
            self.register_buffer(
                "scale_zero",
                torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16),
            )

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), bfloat16: for code that reads weights once (per-code
        tables); it costs a full dequantization, so hot paths ask Attention.dtype instead."""
        if self.bits == 8:
            return self.qweight.to(torch.bfloat16) * self.scale[:, None]
        gs = self.group_size
        q = unpack_int4(self.packed, self.out_features, self.in_features)  # (out, in) int64
        q = q.reshape(self.out_features, -1, gs).to(torch.bfloat16)
        sz = self.scale_zero.transpose(0, 1)  # (out, in/gs, 2)
        w = (q - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (rows, in)
        if rows > DENSE_ROWS:
            y = flat @ self.weight.t()
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed, self.group_size, self.scale_zero
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}"


def _nibbles(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N*K,) int64: low nibble, then high, byte by byte."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).long()


_NIBBLE_SOURCES: dict[tuple[int, int], Tensor] = {}


def _nibble_sources(n: int, k: int) -> Tensor:
    """(N*K,) for the CPU int4 layout: which weight (flat index into (N, K)) each packed nibble
    holds. The layout is the kernel's (blocked for its vector width), so it is read off the
    packer itself: pack the flat indices four bits at a time and collect the nibbles."""
    if (n, k) not in _NIBBLE_SOURCES:
        index = torch.arange(n * k)
        source = torch.zeros(n * k, dtype=torch.long)
        for shift in range(0, max((n * k - 1).bit_length(), 1), 4):
            digits = ((index >> shift) & 15).reshape(n, k).to(torch.int32)  # (N, K)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, 1)
            source |= _nibbles(packed) << shift
        _NIBBLE_SOURCES[(n, k)] = source
    return _NIBBLE_SOURCES[(n, k)]


def unpack_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """The (N, K) values in [0, 15] that _convert_weight_to_int4pack_for_cpu packed."""
    flat = torch.empty(n * k, dtype=torch.long)
    flat[_nibble_sources(n, k)] = _nibbles(packed)
    return flat.reshape(n, k)


def quantize_weights_(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """Replace every nn.Linear inside `model.blocks` (attention and MLP projections) with a
    QuantizedLinear, in place. Embeddings and the (often tied) output head stay as they are."""
    for block in model.blocks:
        for module in list(block.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, QuantizedLinear(child, bits, group_size))
    return model


def store_weights_(model: nn.Module, weights: str) -> nn.Module:
    """The model's blocks stored as `weights` (one of WEIGHTS), in place. Already quantized
    layers are left as they are, so composed-mode ranks sharing one model can each ask."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r} is not one of {tuple(WEIGHTS)}")
    bits = WEIGHTS[weights]
    return model if bits is None else quantize_weights_(model, bits)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take (a tied head counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
