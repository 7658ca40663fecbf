"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (none on o); optional
sliding-window layers (use_sliding_window, from max_window_layers on)."""

from __future__ import annotations

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.families.llama import (
    DECODER_IGNORED,
    DECODER_RULES,
    decoder_config,
    layer_windows,
)
from astra.models.spec import FamilySpec, WeightMap, hf_config


def _config(d: dict) -> DecoderConfig:
    hf = hf_config("Qwen2Config", d)
    return decoder_config(
        hf.to_dict(),
        "qwen2",
        attention_bias=True,
        out_bias=False,
        tie_word_embeddings=hf.tie_word_embeddings,
        layer_windows=layer_windows(hf.layer_types, hf.sliding_window, "qwen2"),
    )


SPEC = FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    config_from_hf=_config,
    model_cls=Decoder,
    weights=WeightMap(("model.",), DECODER_RULES, DECODER_IGNORED),
    task="language-modeling",
    quant_point="kv",
    tied_to="embed_tokens.weight",
    summary="Qwen2/2.5: Llama block, q/k/v biases, optional sliding windows",
)
