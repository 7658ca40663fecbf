"""Llama family (HF `LlamaForCausalLM` numerics): RMSNorm, RoPE, GQA, SwiGLU, tied/untied head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra.models.attention import Attention, KVCache, RotaryEmbedding, causal_mask


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # hidden size D
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    mlp_dim: int  # intermediate size of the SwiGLU MLP
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope parameters when not plain RoPE (e.g. llama3)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict) -> LlamaConfig:
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"Llama hidden_act {d['hidden_act']!r} (only silu)")
        if d.get("pretraining_tp", 1) != 1:
            raise NotImplementedError("pretraining_tp > 1")
        # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        num_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            mlp_dim=d["intermediate_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32 and cast back before the weight, as HF does, for bf16 parity
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.attn = Attention(
            cfg.dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=cfg.attention_bias,
            out_bias=cfg.attention_bias,
            rope=rope,
        )
        self.mlp_norm = RMSNorm(cfg.dim, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.mlp_bias)

    def forward(
        self, x: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, mask, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    causal = True
    modality = "text"  # what the model reads: token ids or pixels
    num_prefix_tokens = 0

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # one RoPE table shared by all layers (a registered submodule of each block's attn)
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, rope) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        return self.embed_tokens(input_ids)  # (B, T, D); positions enter through RoPE

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(x))  # (B, T, V)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """Logits (B, T, V). With `caches` (one KVCache per block) the new tokens continue the
        cached ones; default positions and causal mask assume a contiguous sequence from 0."""
        past = caches[0].length if caches else 0
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)
        if mask is None:
            mask = causal_mask(positions, torch.arange(past + T, device=input_ids.device))
        x = self.embed(input_ids, positions)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, mask, cache=caches[i] if caches else None)
        return self.head(x)
