"""Decoder-only language models (HF `*ForCausalLM` numerics), one block for every family.

Llama, Qwen2, Mistral, Phi-3 and Gemma 2/3 differ only in settings of the same block: which
norm and where (pre-norms always; Gemma adds post-norms around attention and MLP), the gated
MLP's activation, biases, an embedding scale, q/k-norms, score scale and soft-capping, and
per-layer sliding windows with their own RoPE. `DecoderConfig` holds those settings; each
family's spec (astra.models.families) maps its config.json onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra.models.attention import Attention, KVCache, RotaryEmbedding, causal_mask

NORMS = ("rms", "rms_one_plus")  # weight * norm(x) (Llama) or (1 + weight) * norm(x) (Gemma)
ACTIVATIONS = ("silu", "gelu_tanh")  # the gated MLP's: SwiGLU (Llama) or GeGLU-tanh (Gemma)


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    dim: int  # hidden size D
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    mlp_dim: int  # intermediate size of the gated MLP
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope parameters when not plain RoPE (llama3, linear)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (and o unless out_bias says otherwise)
    out_bias: bool | None = None  # None: same as attention_bias (Qwen2: False)
    mlp_bias: bool = False
    norm: str = "rms"  # one of NORMS
    activation: str = "silu"  # one of ACTIVATIONS
    post_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too
    qk_norm: bool = False  # Gemma 3: RMSNorm of each head's q and k before RoPE
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(dim)
    attn_scale: float | None = None  # None: head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5)
    attn_softcap: float | None = None  # Gemma 2: scores capped by softcap * tanh(s / softcap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    # per layer: None = global attention, an int = sliding window of that many tokens
    layer_windows: tuple[int | None, ...] | None = None
    # (theta, scaling) of the sliding layers' RoPE when it differs from the global one (Gemma 3)
    local_rope: tuple[float, dict | None] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.layer_windows is not None and len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers"
            )

    def window(self, layer: int) -> int | None:
        return None if self.layer_windows is None else self.layer_windows[layer]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, one_plus: bool = False):
        super().__init__()
        self.eps = eps
        self.one_plus = one_plus
        # Gemma stores w and scales by (1 + w): its fresh weight is 0, Llama's is 1
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x * rsqrt(mean(x^2) + eps) in fp32, as HF computes it, in one fused op (seven
        # small ops before: on one core a decoding step's norms cost more than its attention)
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.one_plus:  # Gemma: the weight too in fp32, cast back last
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        # Llama: cast back before the weight, as HF does, for bf16 parity
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool, activation: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, rope: RotaryEmbedding, window: int | None):
        super().__init__()
        one_plus = cfg.norm == "rms_one_plus"

        def norm(dim: int = cfg.dim) -> RMSNorm:
            return RMSNorm(dim, cfg.rms_norm_eps, one_plus)

        self.attn_norm = norm()
        self.attn = Attention(
            cfg.dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=cfg.attention_bias,
            out_bias=cfg.attention_bias if cfg.out_bias is None else cfg.out_bias,
            rope=rope,
            q_norm=norm(cfg.head_dim) if cfg.qk_norm else None,
            k_norm=norm(cfg.head_dim) if cfg.qk_norm else None,
            scale=cfg.attn_scale,
            softcap=cfg.attn_softcap,
            window=window,
        )
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.mlp_bias, cfg.activation)
        self.attn_post_norm = norm() if cfg.post_norms else None
        self.mlp_post_norm = norm() if cfg.post_norms else None

    def forward(
        self, x: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None = None
    ) -> Tensor:
        h = self.attn(self.attn_norm(x), positions, mask, cache=cache)
        x = x + (h if self.attn_post_norm is None else self.attn_post_norm(h))
        h = self.mlp(self.mlp_norm(x))
        return x + (h if self.mlp_post_norm is None else self.mlp_post_norm(h))


class Decoder(nn.Module):
    causal = True
    modality = "text"  # what the model reads: token ids or pixels
    num_prefix_tokens = 0

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        # one RoPE table per distinct setting, shared by the layers that use it (a registered
        # submodule of each block's attn)
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        local = rope if config.local_rope is None else RotaryEmbedding(
            config.head_dim, *config.local_rope
        )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(
            Block(config, rope if config.window(i) is None else local, config.window(i))
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.dim, config.rms_norm_eps, config.norm == "rms_one_plus")
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor, positions: Tensor | None = None) -> Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, D); positions enter through RoPE
        if self.config.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def head(self, x: Tensor) -> Tensor:
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        cap = self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """Logits (B, T, V). With `caches` (one KVCache per block) the new tokens continue the
        cached ones; default positions and causal mask assume a contiguous sequence from 0.
        Sliding-window layers narrow the mask themselves (Attention.forward)."""
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
