"""BERT encoder (HF `BertModel` numerics, e.g. all-MiniLM-L6-v2) and sentence mean pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from astra.models.attention import Attention, padding_mask
from astra.models.vit import ACTIVATIONS


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    dim: int  # hidden size D
    num_layers: int
    num_heads: int
    mlp_dim: int  # intermediate size
    max_positions: int  # learned absolute position table size
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} not divisible by num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {self.hidden_act!r}; have {list(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, d: dict) -> BertConfig:
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise NotImplementedError(f"position_embedding_type {d['position_embedding_type']!r}")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise NotImplementedError("BERT as a decoder / with cross-attention")
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            mlp_dim=d["intermediate_size"],
            max_positions=d["max_position_embeddings"],
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            hidden_act=d.get("hidden_act", "gelu"),
        )


class Block(nn.Module):
    """Post-LN: the attention input is the residual stream itself."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.num_heads)
        self.ln1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = ACTIVATIONS[cfg.hidden_act]()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.ln1(x + self.attn(x, positions, mask))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class Bert(nn.Module):
    causal = False
    modality = "text"  # what the model reads: token ids or pixels
    num_prefix_tokens = 1  # [CLS]
    pooling = "mean"  # sentence embedding = mean of the final hidden states (sentence-transformers)

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.word_embed = nn.Embedding(config.vocab_size, D)
        self.pos_embed = nn.Embedding(config.max_positions, D)
        self.type_embed = nn.Embedding(config.type_vocab_size, D)
        self.embed_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))

    def embed(
        self,
        input_ids: Tensor,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embed(input_ids) + self.type_embed(token_type_ids) + self.pos_embed(positions)
        return self.embed_norm(x)  # (B, T, D)

    def head(self, x: Tensor) -> Tensor:
        return x  # pooling is the caller's choice (see mean_pool)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Last hidden state (B, T, D). `mask` (bool, True = may attend) overrides the
        padding mask derived from the HF-style `attention_mask` (B, T)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if mask is None and attention_mask is not None:
            mask = padding_mask(attention_mask)  # (B, 1, 1, T)
        x = self.embed(input_ids, token_type_ids, positions)
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.head(x)


def mean_pool(hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """sentence-transformers mean pooling over non-padding tokens: (B, T, D) -> (B, D)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
