"""Gemma 2 and Gemma 3 (text): RMSNorm as (1 + weight) in fp32, embeddings times
sqrt(hidden), norms before and after attention and MLP, GELU-tanh gated MLP, alternating
sliding-window and global layers, query_pre_attn_scalar; Gemma 2 soft-caps attention scores
and logits, Gemma 3 adds q/k-norms and gives sliding layers their own RoPE base."""

from __future__ import annotations

import math

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.families.llama import DECODER_IGNORED, decoder_config, layer_windows
from astra.models.spec import FamilySpec, WeightMap, hf_config, unsupported

_L = r"layers\.(\d+)\."
_RULES = (
    (r"embed_tokens\.weight", "embed_tokens.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (_L + r"self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"self_attn\.([qk])_norm\.weight", r"blocks.\1.attn.\2_norm.weight"),
    (_L + r"mlp\.((?:gate|up|down)_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (_L + r"input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    # Gemma's post_attention_layernorm is on the attention's output (Llama's is pre-MLP)
    (_L + r"post_attention_layernorm\.weight", r"blocks.\1.attn_post_norm.weight"),
    (_L + r"pre_feedforward_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
    (_L + r"post_feedforward_layernorm\.weight", r"blocks.\1.mlp_post_norm.weight"),
)


def _gemma(d: dict, family: str, hf) -> dict:
    """The settings Gemma 2 and 3 share."""
    if getattr(hf, "use_bidirectional_attention", False):
        raise unsupported(family, "use_bidirectional_attention", "causal attention")
    return dict(
        norm="rms_one_plus",
        post_norms=True,
        embed_scale=math.sqrt(hf.hidden_size),
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        tie_word_embeddings=hf.tie_word_embeddings,
        layer_windows=layer_windows(hf.layer_types, hf.sliding_window, family),
        head_dim=hf.head_dim,
    )


def _gemma2(d: dict) -> DecoderConfig:
    hf = hf_config("Gemma2Config", d)
    return decoder_config(
        hf.to_dict(),
        "gemma2",
        activation="gelu_tanh",
        attn_softcap=hf.attn_logit_softcapping,
        final_softcap=hf.final_logit_softcapping,
        **_gemma(d, "gemma2", hf),
    )


def _gemma3(d: dict) -> DecoderConfig:
    hf = hf_config("Gemma3TextConfig", d)
    rope = hf.rope_parameters  # {"full_attention": {...}, "sliding_attention": {...}}

    def settings(kind: str) -> tuple[float, dict | None]:
        params = dict(rope[kind])
        theta = float(params.pop("rope_theta"))
        if params.get("rope_type", "default") not in ("default", "linear"):
            raise unsupported("gemma3", f"{kind} RoPE {params['rope_type']!r}", "default, linear")
        return theta, None if params.get("rope_type", "default") == "default" else params

    theta, scaling = settings("full_attention")
    return decoder_config(
        {**hf.to_dict(), "rope_parameters": {"rope_theta": theta, **(scaling or {})}},
        "gemma3",
        activation="gelu_tanh",
        qk_norm=True,
        attn_softcap=hf.attn_logit_softcapping,
        final_softcap=hf.final_logit_softcapping,
        local_rope=settings("sliding_attention"),
        **_gemma(d, "gemma3", hf),
    )


def _spec(name: str, model_type: str, config_from_hf, summary: str) -> FamilySpec:
    return FamilySpec(
        name=name,
        model_types=(model_type,),
        config_from_hf=config_from_hf,
        model_cls=Decoder,
        weights=WeightMap(("model.",), _RULES, DECODER_IGNORED),
        task="language-modeling",
        quant_point="kv",
        tied_to="embed_tokens.weight",
        summary=summary,
    )


GEMMA2 = _spec(
    "gemma2", "gemma2", _gemma2,
    "Gemma 2: (1+w) RMSNorm, post-norms, GeGLU, alternating sliding windows, soft-capping",
)
GEMMA3 = _spec(
    "gemma3", "gemma3_text", _gemma3,
    "Gemma 3 (text): Gemma 2's block with q/k-norms and a local RoPE base, no soft-capping",
)
