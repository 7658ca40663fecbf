"""Llama (1, 2, 3.x with its RoPE scaling; SmolLM2): the base decoder block."""

from __future__ import annotations

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.spec import FamilySpec, WeightMap, unsupported

# HF names under model. -> ours; shared by every family built on the decoder block
DECODER_RULES = (
    (r"embed_tokens\.weight", "embed_tokens.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.mlp\.((?:gate|up|down)_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
)
DECODER_IGNORED = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def rope_settings(d: dict, family: str) -> tuple[float, dict | None]:
    """(theta, scaling or None) from config.json: transformers >= 5 writes rope_parameters,
    older configs rope_theta + rope_scaling."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise unsupported(family, "partial_rotary_factor below 1", "1.0")
    if rope_type not in ("default", "linear", "llama3"):
        raise unsupported(family, f"RoPE type {rope_type!r}", "default, linear, llama3")
    return float(theta), None if rope_type == "default" else rope


def decoder_config(d: dict, family: str, activation: str = "silu", **overrides) -> DecoderConfig:
    """The fields every Llama-like config.json has, plus family `overrides`."""
    act = d.get("hidden_activation") or d.get("hidden_act", "silu")  # Gemma: the former
    accepted = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}[activation]
    if act not in accepted:
        raise unsupported(family, f"hidden_act {act!r}", ", ".join(accepted))
    if d.get("pretraining_tp", 1) != 1:
        raise unsupported(family, f"pretraining_tp={d['pretraining_tp']}", "1")
    theta, scaling = rope_settings(d, family)
    num_heads = d["num_attention_heads"]
    fields = dict(
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=d.get("num_key_value_heads") or num_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
        mlp_dim=d["intermediate_size"],
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False),
        activation=activation,
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def layer_windows(layer_types, window: int | None, family: str) -> tuple[int | None, ...] | None:
    """Per-layer sliding windows from transformers' layer_types (None: all global)."""
    if layer_types is None or window is None:
        return None
    kinds = set(layer_types) - {"full_attention", "sliding_attention"}
    if kinds:
        raise unsupported(family, f"layer types {sorted(kinds)}", "full_attention, "
                          "sliding_attention")
    windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    return None if all(w is None for w in windows) else windows


def _config(d: dict) -> DecoderConfig:
    if d.get("layer_types") and "sliding_attention" in d["layer_types"]:
        raise unsupported("llama", "sliding-window layers", "global attention")
    return decoder_config(d, "llama")


SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    config_from_hf=_config,
    model_cls=Decoder,
    weights=WeightMap(("model.",), DECODER_RULES, DECODER_IGNORED),
    task="language-modeling",
    quant_point="kv",
    tied_to="embed_tokens.weight",
    summary="Llama 1/2/3.x, SmolLM2: RMSNorm, RoPE (llama3 scaling), GQA, SwiGLU",
)
