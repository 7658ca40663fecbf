"""Phi-3: the Llama block with fused qkv and gate_up projections (split on load) and an
optional sliding window (Phi-3-mini-4k: 2047)."""

from __future__ import annotations

from torch import Tensor

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.families.llama import DECODER_IGNORED, DECODER_RULES, decoder_config
from astra.models.spec import FamilySpec, WeightMap

_RULES = (
    (r"layers\.(\d+)\.self_attn\.qkv_proj\.weight", r"blocks.\1.attn.qkv_proj.weight"),
    (r"layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"blocks.\1.mlp.gate_up_proj.weight"),
    *DECODER_RULES,
)


def _split_fused(sd: dict[str, Tensor], cfg: DecoderConfig) -> dict[str, Tensor]:
    """qkv_proj (H*hd + 2*Hkv*hd, D) -> q, k, v; gate_up_proj (2*F, D) -> gate, up (gate is
    the first half, as transformers' Phi3MLP chunks it)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {}
    for name, t in sd.items():
        if name.endswith(".attn.qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            parts = t.split([q_rows, kv_rows, kv_rows], dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                out[f"{stem}{proj}.weight"] = part.contiguous()
        elif name.endswith(".mlp.gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            gate, up = t.chunk(2, dim=0)  # (F, D) each
            out[f"{stem}gate_proj.weight"], out[f"{stem}up_proj.weight"] = gate, up
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def _config(d: dict) -> DecoderConfig:
    window = d.get("sliding_window")
    windows = None if window is None else (int(window),) * d["num_hidden_layers"]
    return decoder_config(d, "phi3", layer_windows=windows)


SPEC = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    config_from_hf=_config,
    model_cls=Decoder,
    weights=WeightMap(("model.",), _RULES, DECODER_IGNORED, convert=_split_fused),
    task="language-modeling",
    quant_point="kv",
    tied_to="embed_tokens.weight",
    summary="Phi-3: Llama block with fused qkv and gate_up projections, sliding window",
)
