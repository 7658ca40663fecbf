"""ViT and DINOv2 image encoders: pre-LN blocks (DINOv2: layer scale), class token."""

from __future__ import annotations

from astra.models.spec import FamilySpec, WeightMap
from astra.models.vit import ViT, ViTConfig

_L = r"encoder\.layer\.(\d+)\."  # HF encoder layer prefix
_RULES = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (_L + r"attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2"),
    (_L + r"attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2"),
    (_L + r"attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    # transformers >= 5 in-memory names, in case a checkpoint was written without conversion
    (_L + r"attention\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_L + r"(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_L + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_L + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.lambda1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)

SPEC = FamilySpec(
    name="vit",
    model_types=("vit", "dinov2"),
    config_from_hf=ViTConfig.from_hf,
    model_cls=ViT,
    weights=WeightMap(
        ("vit.", "dinov2."),
        _RULES,
        (r"pooler\..*", r"embeddings\.mask_token", r"classifier\..*"),
    ),
    task="image-classification",
    quant_point="hidden",
    class_tokens="distributed",
    summary="ViT and DINOv2 image encoders: pre-LN, class token (DINOv2: layer scale)",
)
