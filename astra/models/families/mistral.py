"""Mistral: the Llama block with sliding-window attention in every layer (when the config
sets sliding_window; v0.2 and later set none)."""

from __future__ import annotations

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.families.llama import DECODER_IGNORED, DECODER_RULES, decoder_config
from astra.models.spec import FamilySpec, WeightMap, unsupported


def _config(d: dict) -> DecoderConfig:
    if d.get("layer_types"):  # transformers reads such configs as Ministral, not Mistral
        raise unsupported("mistral", "per-layer layer_types", "one sliding_window for all")
    window = d.get("sliding_window")
    windows = None if window is None else (int(window),) * d["num_hidden_layers"]
    return decoder_config(d, "mistral", layer_windows=windows)


SPEC = FamilySpec(
    name="mistral",
    model_types=("mistral",),
    config_from_hf=_config,
    model_cls=Decoder,
    weights=WeightMap(("model.",), DECODER_RULES, DECODER_IGNORED),
    task="language-modeling",
    quant_point="kv",
    tied_to="embed_tokens.weight",
    summary="Mistral: Llama block with sliding-window attention",
)
