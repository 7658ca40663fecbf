"""ViT and DINOv2 encoders (HF `ViTModel` / `Dinov2Model` numerics), one shared pre-LN block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra.models.attention import Attention

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def _pair(v: int | list[int]) -> int:
    # HF allows image_size/patch_size as [h, w]; we only handle square ones
    if isinstance(v, (list, tuple)):
        if v[0] != v[1]:
            raise NotImplementedError(f"non-square size {v} is not supported")
        return int(v[0])
    return int(v)


@dataclass(frozen=True)
class ViTConfig:
    dim: int  # hidden size D
    num_layers: int
    num_heads: int
    mlp_dim: int  # MLP hidden size
    image_size: int  # side (pixels) the position embeddings were trained for
    patch_size: int  # side of a square patch (pixels)
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    use_layer_scale: bool = False  # DINOv2: per-channel lambda1 on both residual branches

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} not a multiple of {self.patch_size=}")
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {self.hidden_act!r}; have {list(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> ViTConfig:
        model_type = d.get("model_type")
        if model_type not in ("vit", "dinov2"):
            raise ValueError(f"ViTConfig.from_hf: model_type {model_type!r} is not vit/dinov2")
        if d.get("num_register_tokens", 0):
            raise NotImplementedError("DINOv2 register tokens (num_register_tokens > 0)")
        if d.get("use_swiglu_ffn", False):
            raise NotImplementedError("DINOv2 SwiGLU FFN (use_swiglu_ffn=true, giant models)")
        dim = d["hidden_size"]
        is_dinov2 = model_type == "dinov2"
        return cls(
            dim=dim,
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            # DINOv2 configs give mlp_ratio, not intermediate_size
            mlp_dim=int(dim * d.get("mlp_ratio", 4)) if is_dinov2 else d["intermediate_size"],
            image_size=_pair(d.get("image_size", 224)),
            patch_size=_pair(d.get("patch_size", 14 if is_dinov2 else 16)),
            num_channels=d.get("num_channels", 3),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6 if is_dinov2 else 1e-12),
            qkv_bias=d.get("qkv_bias", True),
            hidden_act=d.get("hidden_act", "gelu"),
            use_layer_scale=is_dinov2,
        )


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.hidden_act)
        self.ls1 = LayerScale(cfg.dim) if cfg.use_layer_scale else nn.Identity()
        self.ls2 = LayerScale(cfg.dim) if cfg.use_layer_scale else nn.Identity()

    def forward(self, x: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), positions, mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Encoder only: `forward` returns the final-LayerNorm hidden states (B, 1 + P, D)."""

    causal = False
    modality = "image"  # what the model reads: token ids or pixels
    num_prefix_tokens = 1  # [CLS]
    pooling = "cls"  # image features = the final-norm class token

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D, p = config.dim, config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def position_embeddings(self, height: int, width: int) -> Tensor:
        """Position embeddings for an image of `height` x `width` pixels, (1, 1 + P, D).

        Other sizes are bicubically resampled exactly as HF `interpolate_pos_encoding` does
        (in fp32, `size=` target, align_corners=False), so outputs match HF at any resolution.
        """
        p, D = self.config.patch_size, self.config.dim
        num_positions = self.config.num_patches
        new_h, new_w = height // p, width // p
        if new_h * new_w == num_positions and height == width:
            return self.pos_embed
        side = int(num_positions**0.5)
        grid = self.pos_embed[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # (1, D, s, s)
        grid = F.interpolate(
            grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False
        ).to(self.pos_embed.dtype)  # (1, D, new_h, new_w)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, D)  # (1, P, D)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)  # (1, 1 + P, D)

    def embed(self, pixel_values: Tensor) -> Tensor:
        B, _, H, W = pixel_values.shape
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1 + P, D)
        return x + self.position_embeddings(H, W)

    def head(self, x: Tensor) -> Tensor:
        return self.norm(x)

    def forward(
        self, pixel_values: Tensor, positions: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        x = self.embed(pixel_values)  # (B, T, D)
        if positions is None:  # unused by the blocks (no RoPE) but kept uniform with decoders
            positions = torch.arange(x.shape[1], device=x.device)
        for block in self.blocks:
            x = block(x, positions, mask)
        return self.head(x)
