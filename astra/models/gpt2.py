"""GPT-2 (HF `GPT2LMHeadModel` numerics): learned positions, pre-LN, gelu_new, tied LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from astra.models.attention import Attention, KVCache, causal_mask
from astra.models.vit import ACTIVATIONS


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    dim: int  # n_embd
    num_layers: int
    num_heads: int
    max_positions: int  # n_positions: learned position table size
    mlp_dim: int  # n_inner, 4 * dim by default
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} not divisible by num_heads={self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise NotImplementedError(f"activation {self.activation!r}; have {list(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, d: dict) -> GPT2Config:
        if d.get("scale_attn_by_inverse_layer_idx") or not d.get("scale_attn_weights", True):
            raise NotImplementedError("GPT-2 attention scaling other than 1/sqrt(head_dim)")
        if not d.get("tie_word_embeddings", True):
            raise NotImplementedError("GPT-2 with an untied LM head")
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["n_embd"],
            num_layers=d["n_layer"],
            num_heads=d["n_head"],
            max_positions=d["n_positions"],
            mlp_dim=d.get("n_inner") or 4 * d["n_embd"],
            layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            activation=d.get("activation_function", "gelu_new"),
        )


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = ACTIVATIONS[cfg.activation]()
        self.proj = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(
        self, x: Tensor, positions: Tensor, mask: Tensor | None, cache: KVCache | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), positions, mask, cache=cache)
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


class GPT2(nn.Module):
    causal = True
    modality = "text"  # what the model reads: token ids or pixels
    num_prefix_tokens = 0

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_positions, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in every GPT-2 checkpoint

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        # input_ids: (B, T), positions: (T,) absolute, so a shard of a sequence embeds correctly
        return self.wte(input_ids) + self.wpe(positions)  # (B, T, D)

    def head(self, x: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, V)

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
