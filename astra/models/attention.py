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

from astra.models.quantize import QuantizedLinear


def causal_mask(q_positions: Tensor, k_positions: Tensor, window: int | None = None) -> Tensor:
    """Boolean (Tq, Tk) mask, True = may attend: a query sees keys at its position or before,
    and with a sliding `window` only the `window` latest of them (itself included), as
    transformers' sliding-window layers do (Mistral, Gemma 2/3, Phi-3).

    Built from absolute positions so a device holding any subset of tokens gets the right mask.
    """
    delta = q_positions[:, None] - k_positions[None, :]  # (Tq, Tk)
    return (delta >= 0) if window is None else (delta >= 0) & (delta < window)


def seen_within_window(key_positions: Tensor, query_positions: Tensor, window: int) -> Tensor:
    """(Tk,) bool: True where some query sees the key through a causal sliding window, i.e.
    a query sits at the key's position or up to window-1 after it. What a device must send of
    a sliding-window layer: keys no other device's window reaches need not travel."""
    queries = query_positions.sort().values
    first = torch.searchsorted(queries, key_positions)  # first query at or after each key
    found = first < queries.numel()
    nearest = queries[first.clamp(max=max(queries.numel() - 1, 0))] if queries.numel() else first
    return found & (nearest - key_positions < window)


def window_mask(q_positions: Tensor, k_positions: Tensor, window: int) -> Tensor:
    """True where a key is not older than the sliding window: q - k < window. Positions (T,)
    give (Tq, Tk); per-row positions (B, T) give (B, 1, Tq, Tk)."""
    if q_positions.dim() == 2:
        return (q_positions[:, None, :, None] - k_positions[..., None, None, :]) < window
    return (q_positions[:, None] - k_positions[None, :]) < window  # (Tq, Tk)


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


ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    """RoPE in the HF/Llama "rotate half" layout (first half of head_dim pairs with second)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":  # positions divided by `factor` (Gemma 3's global layers)
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type != "default":
            raise NotImplementedError(
                f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        # not persistent: derived from the config, and HF checkpoints do not carry it
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)
        self._memo: tuple | None = None  # the last (positions, versions, cos, sin): `tables`

    def forward(self, t: Tensor, positions: Tensor) -> Tensor:
        # t: (B, H, T, hd); positions: (T,) or (B, T) absolute token positions
        cos, sin = self.tables(positions, t.dtype)
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (T, hd) or (B, 1, T, hd) in `dtype` for `positions`. The last pair is
        kept: a forward pass hands the same positions tensor to every block, for queries and
        keys, so a decoding step computes them once instead of twice per block (a dozen small
        ops each, which on one core cost as much as a block's attention over 500 tokens)."""
        # inference-mode tensors keep no version counter: no memo for them (computed each call)
        plain = not (positions.is_inference() or self.inv_freq.is_inference())
        key = (positions._version, dtype, self.inv_freq._version) if plain else None
        memo = self._memo
        if key is not None and memo is not None and memo[0] is positions and memo[1] == key:
            return memo[2], memo[3]
        freqs = positions[..., None].float() * self.inv_freq  # (..., T, hd/2), fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if positions.dim() == 2:  # per-batch positions broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        # holding `positions` keeps its identity unique; _version catches in-place edits
        self._memo = (positions, key, cos, sin) if key is not None else None
        return cos, sin


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
    """Multi-head (optionally grouped-query) self-attention with separate q/k/v/o projections.

    Family features, all optional: `q_norm`/`k_norm` (per-head norms applied in `project`, so
    the "kv" quantization point codes the normed keys, before RoPE: Gemma 3), `scale` (score
    scale when not head_dim**-0.5: Gemma's query_pre_attn_scalar), `softcap` (scores become
    softcap * tanh(scores / softcap): Gemma 2) and `window` (sliding-window attention: a query
    sees its `window` latest keys; every path that builds masks from positions asks for it).
    """

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
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"sliding window must be at least 1 token, got {window}")
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
        self.q_norm = q_norm
        self.k_norm = k_norm
        # a scale other than SDPA's head_dim**-0.5 is folded into q (exact up to rounding), so
        # every attention kernel of every path applies it without knowing
        default = self.head_dim**-0.5
        self.q_factor = None if scale is None or math.isclose(scale, default) else scale / default
        self.softcap = softcap
        self.window = window

    @property
    def dtype(self) -> torch.dtype:
        """The precision activations run in (a weight-quantized projection reports the one
        its model computes in, not its storage)."""
        proj = self.o_proj
        return proj.compute_dtype if isinstance(proj, QuantizedLinear) else proj.weight.dtype

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # x: (B, T, D) -> q (B, H, T, hd), k and v (B, Hkv, T, hd); no RoPE yet
        k, v = self.project_kv(x)
        q = self._split_heads(self.q_proj(x))
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.q_factor is not None:
            q = q * self.q_factor
        return q, k, v

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self._split_heads(self.k_proj(x))
        if self.k_norm is not None:
            k = self.k_norm(k)  # before RoPE and before the "kv" quantization point
        return k, self._split_heads(self.v_proj(x))

    def visible(self, q_positions: Tensor, k_positions: Tensor, causal: bool = True) -> Tensor:
        """(Tq, Tk) True = may attend, by absolute positions: causal (decoders) and this
        layer's sliding window."""
        if causal:
            return causal_mask(q_positions, k_positions, self.window)
        if self.window is not None:
            raise ValueError("a sliding window needs causal attention")
        return torch.ones(len(q_positions), len(k_positions), dtype=torch.bool)

    def rotate(self, t: Tensor, positions: Tensor | None) -> Tensor:
        return t if self.rope is None else self.rope(t, positions)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # q: (B, H, Tq, hd), k/v: (B, Hkv, Tk, hd), mask: bool broadcastable to (B, 1, Tq, Tk)
        if self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.softcap)
        elif q.shape[2] <= FEW_QUERIES and q.device.type == "cpu":
            y = few_query_attention(q, k, v, mask)  # decoding steps
        else:
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
        if self.window is not None:
            # every caller that keeps a cache fills it from position 0 onwards (single device,
            # pipeline stages, decoding), so the cached keys sit at 0..T_past+T-1
            k_positions = positions if cache is None else torch.arange(k.shape[2])
            near = window_mask(positions, k_positions.to(positions.device), self.window)
            mask = near if mask is None else mask & near
        return self.attend(q, k, v, mask)


# queries per call up to which `few_query_attention` beats the CPU flash kernel (decoding)
FEW_QUERIES = 4


def few_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v for a few query rows, as two batched matmuls, the softmax in
    float32: q (B,H,Tq,hd), k/v (B,Hkv,Tk,hd), mask bool broadcastable to (B,1,Tq,Tk) ->
    (B,H,Tq,hd). A decoding step is one query against the whole cache, where the CPU flash
    kernel spends most of its time on set-up (fp32 about 0.2 ms, bf16 about 0.9 ms per call for
    SmolLM2 at 1024 cached tokens, half of a bf16 step). Grouped-query heads are stacked as rows
    of their kv head, so each key and value is read once."""
    b, h, tq, hd = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = h // hkv
    rows = q.reshape(b, hkv, group * tq, hd)  # (B,H,Tq,hd) -> (B,Hkv,G*Tq,hd): head-major
    scores = torch.matmul(rows, k.transpose(-1, -2)).float() * hd**-0.5  # (B,Hkv,G*Tq,Tk)
    if mask is not None:
        if mask.dim() == 4:  # (B,1,Tq,Tk) -> (B,1,1,Tq,Tk)
            mask = mask.unsqueeze(2)
        scores = scores.view(b, hkv, group, tq, tk).masked_fill(~mask, float("-inf"))
        scores = scores.view(b, hkv, group * tq, tk)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, h, tq, hd)  # (B,Hkv,G*Tq,hd) -> (B,H,Tq,hd)


def softcapped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, softcap: float
) -> Tensor:
    """Attention with Gemma 2's capped scores, softcap * tanh(s / softcap), in float32 as
    transformers computes them; q (B,H,Tq,hd), k/v (B,Hkv,Tk,hd) -> (B,H,Tq,hd)."""
    out, _ = softcapped_attention_lse(q, k, v, mask, softcap)
    return out


def softcapped_attention_lse(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, softcap: float
) -> tuple[Tensor, Tensor]:
    """softcapped_attention plus each query's log-sum-exp (B,H,Tq) in float32, -inf (and
    output 0) where a query sees no key, so partial results merge exactly."""
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:  # grouped-query attention: share each kv head across h/Hkv query heads
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B,H,Tq,Tk)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Tq)
    weights = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
    return (weights @ v.float()).to(q.dtype), lse
