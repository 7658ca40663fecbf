"""Attention: the seam ASTRA hooks into, plus masks, RoPE and a KV cache.

Every model builds its blocks on `Attention`, so code applied from the outside (sequence
parallelism, quantized remote K/V) can call the pieces `project`, `rotate` and `attend` on any
subset of tokens, given their absolute positions. Inference only: no dropout anywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_mask(q_positions: Tensor, k_positions: Tensor) -> Tensor:
    """Boolean (Tq, Tk) mask, True = may attend: a query sees keys at its position or before.

    Built from absolute positions so a device holding any subset of tokens gets the right mask.
    """
    return q_positions[:, None] >= k_positions[None, :]  # (Tq, Tk)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """HF-style (B, T) 1/0 attention mask -> boolean (B, 1, 1, T) key mask, True = real token."""
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)


def llama3_inv_freq(inv_freq: Tensor, params: dict) -> Tensor:
    """Llama 3.1 rescaling: long wavelengths divided by `factor`, a smooth ramp in between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """RoPE in the HF/Llama "rotate half" layout (first half of head_dim pairs with second)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        elif rope_type != "default":
            raise NotImplementedError(
                f"RoPE type {rope_type!r} is not supported; supported: 'default', 'llama3'"
            )
        # not persistent: derived from the config, and HF checkpoints do not carry it
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)

    def forward(self, t: Tensor, positions: Tensor) -> Tensor:
        # t: (B, H, T, hd); positions: (T,) or (B, T) absolute token positions
        freqs = positions[..., None].float() * self.inv_freq  # (..., T, hd/2), fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
        cos, sin = emb.cos().to(t.dtype), emb.sin().to(t.dtype)
        if positions.dim() == 2:  # per-batch positions broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin


class KVCache:
    """One layer's keys/values seen so far; `update` appends along the token axis.

    Positions are whatever the caller rotated with; `length` is the number of cached tokens.
    Storage is preallocated and grows by doubling, so a decoding step writes one token in place
    instead of copying the whole cache (torch.cat per step is O(T) per token, O(T^2) per
    answer); `k`/`v` are views of the filled part.
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None  # (B, Hkv, capacity, hd)
        self._v: Tensor | None = None
        self.length = 0

    @property
    def k(self) -> Tensor | None:  # (B, Hkv, T_past, hd)
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, : self.length]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, Hkv, T, hd); returns every cached key and value (views)."""
        end = self.length + k.shape[2]
        if self._k is None or end > self._k.shape[2] or self._k.dtype != k.dtype:
            capacity = end if self._k is None else max(end, 2 * self._k.shape[2])
            self._k, self._v = self._grown(self._k, k, capacity), self._grown(self._v, v, capacity)
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        self.length = end
        return self.k, self.v

    def _grown(self, old: Tensor | None, new: Tensor, capacity: int) -> Tensor:
        b, h, _, hd = new.shape
        out = new.new_empty(b, h, capacity, hd)  # (B, Hkv, capacity, hd)
        if old is not None and self.length:
            out[:, :, : self.length] = old[:, :, : self.length]
        return out


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) self-attention with separate q/k/v/o projections."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = True,
        out_bias: bool = True,
        rope: RotaryEmbedding | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or dim // num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} not divisible by {self.num_kv_heads=}")
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=out_bias)
        self.rope = rope

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x: (B, T, D) -> q (B, H, T, hd), k and v (B, Hkv, T, hd); no RoPE yet
        k, v = self.project_kv(x)
        return self._split_heads(self.q_proj(x)), k, v

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def rotate(self, t: Tensor, positions: Tensor | None) -> Tensor:
        return t if self.rope is None else self.rope(t, positions)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # q: (B, H, Tq, hd), k/v: (B, Hkv, Tk, hd), mask: bool broadcastable to (B, 1, Tq, Tk)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, Tq, hd)
        B, H, Tq, hd = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, Tq, H * hd))  # (B, Tq, D)

    def forward(
        self, x: Tensor, positions: Tensor | None, mask: Tensor | None, cache: KVCache | None = None
    ) -> Tensor:
        q, k, v = self.project(x)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, T_past + T, hd)
        return self.attend(q, k, v, mask)
