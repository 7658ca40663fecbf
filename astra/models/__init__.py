"""Single-device reference models and the HF-format checkpoint loader."""

from astra.models.attention import (
    Attention,
    KVCache,
    RotaryEmbedding,
    causal_mask,
    padding_mask,
)
from astra.models.bert import Bert, BertConfig, mean_pool
from astra.models.decoder import Decoder, DecoderConfig
from astra.models.families import SPECS, UnsupportedModelError, spec_for
from astra.models.gpt2 import GPT2, GPT2Config
from astra.models.loading import (
    context_length,
    convert_state_dict,
    image_transform,
    load_model,
    load_tokenizer,
    model_family,
    model_kind,
    model_spec,
    num_input_tokens,
    read_config,
    read_state_dict,
)
from astra.models.vit import ViT, ViTConfig

__all__ = [
    "GPT2",
    "SPECS",
    "Attention",
    "Bert",
    "BertConfig",
    "GPT2Config",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "RotaryEmbedding",
    "UnsupportedModelError",
    "ViT",
    "ViTConfig",
    "causal_mask",
    "context_length",
    "convert_state_dict",
    "image_transform",
    "load_model",
    "load_tokenizer",
    "mean_pool",
    "model_family",
    "model_kind",
    "model_spec",
    "num_input_tokens",
    "padding_mask",
    "read_config",
    "read_state_dict",
    "spec_for",
]
