"""Parity of astra.models with transformers on tiny random checkpoints, plus the seams.

Every HF model is built with a fixed seed, its parameters are jittered so that LayerNorm
affines, layer scales and biases are not at their trivial init values, saved with
save_pretrained and loaded back with our `load_model`. Comparisons use rtol=0 and the atol
stated next to each test (fp32 on CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from astra.models import (  # noqa: E402
    KVCache,
    causal_mask,
    image_transform,
    load_model,
    mean_pool,
    model_family,
)

ATOL = 1e-5  # fp32 parity with transformers: same maths, different kernels and op order


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def save_hf(model: torch.nn.Module, path) -> torch.nn.Module:
    """Jitter every parameter (seeded), save as an HF checkpoint dir, return the eval model."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


def build(cls, config, path):
    torch.manual_seed(0)
    return save_hf(cls(config), path)


# ---------------------------------------------------------------- encoders


def tiny_vit(**kw):
    return transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, **kw,
    )  # fmt: skip


def tiny_dinov2(**kw):
    return transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=56, patch_size=14, layerscale_value=0.5, **kw,
    )  # fmt: skip


@torch.no_grad()
def test_vit_parity(tmp_path):
    hf = build(transformers.ViTModel, tiny_vit(), tmp_path)
    ours = load_model(tmp_path)
    assert model_family(tmp_path) == "vit" and ours.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x), hf(pixel_values=x).last_hidden_state)
    # other resolution: HF only interpolates when asked; we always do
    x = torch.randn(1, 3, 48, 48)
    expected = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert_close(ours(x), expected)


@torch.no_grad()
def test_dinov2_parity(tmp_path):
    hf = build(transformers.Dinov2Model, tiny_dinov2(), tmp_path)
    ours = load_model(tmp_path)
    assert model_family(tmp_path) == "vit"
    x = torch.randn(2, 3, 56, 56)
    out = ours(x)
    assert out.shape == (2, 1 + 16, 64)
    assert_close(out, hf(pixel_values=x).last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(70, 70), (42, 70), (28, 28)])
def test_dinov2_position_interpolation(tmp_path, hw):
    """HF Dinov2 always resamples its 4x4 position grid bicubically to the input's grid."""
    hf = build(transformers.Dinov2Model, tiny_dinov2(), tmp_path)
    ours = load_model(tmp_path)
    x = torch.randn(1, 3, *hw)
    assert_close(ours(x), hf(pixel_values=x).last_hidden_state)


@torch.no_grad()
def test_bert_parity_with_padding(tmp_path):
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    hf = build(transformers.BertModel, config, tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, 99, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 6:] = 0  # second sentence padded
    types = torch.zeros(2, 10, dtype=torch.long)
    types[:, 5:] = 1
    expected = hf(input_ids=ids, attention_mask=attention_mask, token_type_ids=types)
    out = ours(ids, attention_mask, types)
    assert_close(out, expected.last_hidden_state)
    # sentence-transformers mean pooling over the real tokens only
    pooled = mean_pool(out, attention_mask)
    assert_close(pooled[1], out[1, :6].mean(0), atol=1e-6)


# ---------------------------------------------------------------- decoders


def tiny_gpt2():
    return transformers.GPT2Config(
        vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


LLAMA_VARIANTS = {
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied_bias": dict(
        num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True
    ),
    "head_dim_llama3_rope": dict(
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),  # fmt: skip
}


def tiny_llama(variant: str):
    return transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        **LLAMA_VARIANTS[variant],
    )  # fmt: skip


@torch.no_grad()
def test_gpt2_parity(tmp_path):
    hf = build(transformers.GPT2LMHeadModel, tiny_gpt2(), tmp_path)
    ours = load_model(tmp_path)
    assert ours.causal and ours.lm_head.weight is ours.wte.weight
    ids = torch.randint(0, 97, (2, 12))
    assert_close(ours(ids), hf(input_ids=ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_parity(tmp_path, variant):
    config = tiny_llama(variant)
    hf = build(transformers.LlamaForCausalLM, config, tmp_path)
    ours = load_model(tmp_path)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == config.tie_word_embeddings
    ids = torch.randint(0, 97, (2, 40))  # longer than llama3's original context (32)
    assert_close(ours(ids), hf(input_ids=ids).logits)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_decode_matches_full_forward(tmp_path, family):
    if family == "gpt2":
        build(transformers.GPT2LMHeadModel, tiny_gpt2(), tmp_path)
    else:
        build(transformers.LlamaForCausalLM, tiny_llama("gqa_tied"), tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids)
    caches = [KVCache() for _ in model.blocks]
    steps = [model(ids[:, :5], caches=caches)]  # prefill, then one token at a time
    steps += [model(ids[:, t : t + 1], caches=caches) for t in range(5, 12)]
    assert caches[0].length == 12
    assert_close(torch.cat(steps, dim=1), full)


# ---------------------------------------------------------------- the seams


def _seam_models(tmp_path):
    specs = {
        "vit": (transformers.ViTModel, tiny_vit()),
        "bert": (transformers.BertModel, transformers.BertConfig(
            vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)),
        "gpt2": (transformers.GPT2LMHeadModel, tiny_gpt2()),
        "llama": (transformers.LlamaForCausalLM, tiny_llama("gqa_tied")),
    }  # fmt: skip
    for name, (cls, config) in specs.items():
        build(cls, config, tmp_path / name)
        yield name, load_model(tmp_path / name)


@torch.no_grad()
def test_attention_seams_by_hand(tmp_path):
    """project/rotate/attend by hand == attn.forward, and a subset of query tokens with their
    absolute positions and causal_mask(q_pos, k_pos) reproduces those rows of the full output:
    what sequence parallelism does from outside the model."""
    for _, model in _seam_models(tmp_path):
        T = 10
        x = torch.randn(2, T, 64)
        positions = torch.arange(T)
        mask = causal_mask(positions, positions) if model.causal else None
        for block in model.blocks:
            attn = block.attn
            full = attn(x, positions, mask)
            q, k, v = attn.project(x)
            assert q.shape == (2, attn.num_heads, T, attn.head_dim)
            assert k.shape == v.shape == (2, attn.num_kv_heads, T, attn.head_dim)
            k2, v2 = attn.project_kv(x)
            assert torch.equal(k, k2) and torch.equal(v, v2)
            q, k = attn.rotate(q, positions), attn.rotate(k, positions)
            assert_close(attn.attend(q, k, v, mask), full, atol=1e-6)
            # a device holding tokens {1, 4, 7, 8} with everyone's keys/values
            local = torch.tensor([1, 4, 7, 8])
            q_local = attn.rotate(attn.project(x[:, local])[0], positions[local])
            local_mask = causal_mask(positions[local], positions) if model.causal else None
            y_local = attn.attend(q_local, k, v, local_mask)
            assert_close(y_local, full[:, local], atol=1e-6)


@torch.no_grad()
def test_blocks_accept_positions_and_mask(tmp_path):
    """forward == head(blocks(embed)) with the contract's block(x, positions, mask) calls."""
    for _, model in _seam_models(tmp_path):
        if model.causal:
            inputs = torch.randint(0, 97, (1, 8))
            positions = torch.arange(8)
            x = model.embed(inputs, positions)
            mask = causal_mask(positions, positions)
        elif hasattr(model, "patch_embed"):
            inputs = torch.randn(1, 3, 32, 32)
            x, mask = model.embed(inputs), None
            positions = torch.arange(x.shape[1])
        else:
            inputs = torch.randint(0, 99, (1, 8))
            x, mask, positions = model.embed(inputs), None, torch.arange(8)
        for block in model.blocks:
            x = block(x, positions, mask)
        assert torch.equal(model.head(x), model(inputs))


def test_rope_tables_are_reused_for_the_same_positions_and_only_for_them():
    """A decoding step hands one positions tensor to every block: RoPE computes cos/sin once.
    New values (another tensor, or the same one edited in place) and inference-mode tensors,
    which keep no version counter, get tables of their own."""
    from astra.models.attention import RotaryEmbedding

    rope = RotaryEmbedding(8)
    t = torch.randn(1, 2, 3, 8)
    positions = torch.tensor([5, 6, 7])
    first = rope(t, positions)
    assert rope.tables(positions, t.dtype)[0] is rope.tables(positions, t.dtype)[0]
    positions += 10  # in place: same object, new values
    assert torch.allclose(rope(t, positions), rope(t, torch.tensor([15, 16, 17])))
    assert not torch.allclose(rope(t, positions), first)
    with torch.inference_mode():
        inference_positions = torch.tensor([5, 6, 7])
        assert torch.equal(rope(t, inference_positions), first)
        assert torch.equal(rope(t, inference_positions), first)


# ---------------------------------------------------------------- loading


def test_unsupported_rope_type_is_named():
    from astra.models import UnsupportedModelError, spec_for

    d = tiny_llama("gqa_tied").to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="'yarn'.*default, linear, llama3"):
        spec_for(d).config_from_hf(d)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="unsupported model_type 't5'.*bert.*llama"):
        load_model(tmp_path)


def test_load_reports_missing_and_unexpected_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    build(transformers.GPT2LMHeadModel, tiny_gpt2(), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["transformer.h.0.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 \[blocks\.1\.fc\.weight\].*h\.0\.extra"):
        load_model(tmp_path)


def test_load_dtype_keeps_rope_in_fp32(tmp_path):
    build(transformers.LlamaForCausalLM, tiny_llama("gqa_tied"), tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.rope.inv_freq.dtype == torch.float32
    assert model(torch.randint(0, 97, (1, 4))).dtype == torch.bfloat16


def test_image_transform(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    transform = image_transform(tmp_path, size=28)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    x = transform(rgb)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    gray = transform(np.full((20, 20), 255, dtype=np.uint8))
    assert gray.shape == (3, 28, 28) and torch.allclose(gray, torch.ones(3, 28, 28))
    imagenet = image_transform({"image_size": 16})(np.zeros((8, 8, 3), dtype=np.uint8))
    assert imagenet.shape == (3, 16, 16)
    assert_close(imagenet[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("queries", [1, 3])
def test_few_query_attention_matches_sdpa(dtype, atol, queries):
    """The decoding kernel (astra.models.attention.few_query_attention) against SDPA: grouped
    heads, no mask, a (Tq, Tk) mask and a (B, 1, Tq, Tk) one; fp32 within 1e-5, bf16 within
    2e-2 (its scores are rounded to bf16 once, as transformers' eager attention does)."""
    import torch.nn.functional as F

    from astra.models.attention import causal_mask, few_query_attention

    torch.manual_seed(0)
    b, h, hkv, tk, hd = 2, 6, 2, 37, 16
    q = torch.randn(b, h, queries, hd, dtype=dtype)
    k, v = torch.randn(b, hkv, tk, hd, dtype=dtype), torch.randn(b, hkv, tk, hd, dtype=dtype)
    positions = torch.arange(tk - queries, tk)
    window = causal_mask(positions, torch.arange(tk), window=8)  # (Tq, Tk), a sliding window
    per_batch = window[None, None].expand(b, 1, queries, tk).clone()
    per_batch[1, 0, :, :3] = True  # batch 1 also sees the first keys
    for mask in (None, window, per_batch):
        expected = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
        )
        got = few_query_attention(q, k, v, mask)
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=atol)


def test_matmul_layout_keeps_the_values_and_the_outputs(tmp_path):
    """astra.parallel.passes.matmul_layout_: wide fp32 weights are stored (in, out), the rest
    (out, in); the weights' values and the model's logits do not change."""
    from astra.parallel.passes import matmul_layout_, to_compute_dtype_

    build(transformers.LlamaForCausalLM, tiny_llama("gqa_tied"), tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        before = model(ids)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        matmul_layout_(model)
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    gate = model.blocks[0].mlp.gate_proj.weight  # (hidden, dim): wider than tall
    down = model.blocks[0].mlp.down_proj.weight  # (dim, hidden)
    assert gate.stride() == (1, gate.shape[0]) and down.is_contiguous()
    to_compute_dtype_(model, torch.bfloat16)
    matmul_layout_(model)  # bf16 multiplies a row fastest (out, in)
    assert model.blocks[0].mlp.gate_proj.weight.is_contiguous()
