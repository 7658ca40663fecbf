"""Shared fixtures: a tiny HF-format Llama checkpoint (random weights, SmolLM2's tokenizer)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF-format dir, with SmolLM2's tokenizer if prepared."""
    from astra.hub import models_dir

    tok_dir = models_dir() / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("needs the smollm2-135m tokenizer (astra models prepare smollm2-135m)")
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = HFLlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for name in names + ("chat_template.jinja",):
        if (tok_dir / name).is_file():
            (out / name).write_bytes((tok_dir / name).read_bytes())
    return out


