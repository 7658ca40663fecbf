"""Every decoder family on its spec: parity with transformers on tiny random configs built with
transformers' own config classes, sliding windows in every path, and ASTRA on each family.

Tolerances (fp32, CPU): logits against transformers' eager attention atol 2e-5 (same maths,
different op order; Gemma 2's capped scores go through tanh twice); paths that must be exact
against our own single-device model atol 1e-5; the runtime against the simulation atol 1e-4,
as in test_parallel. Every config uses a sliding window (6 tokens) shorter than the inputs, so
a path that ignored the window would fail.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from astra.models import KVCache, UnsupportedModelError, load_model, model_spec  # noqa: E402
from astra.models.attention import causal_mask  # noqa: E402
from astra.models.families import SPECS, spec_for  # noqa: E402
from astra.net.link import LinkConfig  # noqa: E402
from astra.net.lockstep import run_lockstep, share_weights_copy  # noqa: E402
from astra.parallel.config import AstraConfig  # noqa: E402
from astra.parallel.engine import build_sequence_layout, rank_forward  # noqa: E402
from astra.parallel.placement import PlacementConfig  # noqa: E402
from astra.parallel.runtime import attend_positions  # noqa: E402
from astra.parallel.simulate import apply_astra  # noqa: E402

ATOL_HF = 2e-5
ATOL_EXACT = 1e-5
ATOL_RUNTIME = 1e-4
WINDOW = 6
VOCAB = 97

_SMALL = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=96, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)  # fmt: skip


def hf_config(family: str, vocab: int = VOCAB):
    """A tiny config of `family`, built by transformers' own config class."""
    small = dict(_SMALL, vocab_size=vocab)
    if family == "llama":
        return transformers.LlamaConfig(**small)
    if family == "qwen2":  # sliding windows from layer 1 on; q/k/v biases
        return transformers.Qwen2Config(
            **small, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
    if family == "mistral":
        return transformers.MistralConfig(**small, sliding_window=WINDOW)
    if family == "phi3":
        return transformers.Phi3Config(**small, sliding_window=WINDOW)
    if family == "gemma2":  # small caps so that capping changes the numbers
        return transformers.Gemma2Config(
            **small, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        )  # fmt: skip
    if family == "gemma3":  # 2:1 sliding:global, own RoPE bases, linear scaling on global
        return transformers.Gemma3TextConfig(
            **small, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            },
        )  # fmt: skip
    raise AssertionError(family)


FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma2", "gemma3")
WINDOWED = ("qwen2", "mistral", "phi3", "gemma2", "gemma3")


def save_tiny(family: str, path, vocab: int = VOCAB):
    """A seeded random HF model of `family` with jittered weights (norms and biases off their
    trivial init), saved to `path`; returns the transformers model (eager attention)."""
    config = hf_config(family, vocab)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, save_tiny(request.param, path), path


@torch.no_grad()
def test_parity_with_transformers(family_dir):
    family, hf, path = family_dir
    ours = load_model(path)
    assert model_spec(path).name == family
    ids = torch.randint(0, VOCAB, (2, 24))  # 4 windows long
    torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, rtol=0, atol=ATOL_HF)


@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(family_dir):
    _, _, path = family_dir
    model = load_model(path)
    ids = torch.randint(0, VOCAB, (1, 20))
    caches = [KVCache() for _ in model.blocks]
    steps = [model(ids[:, :9], caches=caches)]  # prefill past the window, then token by token
    steps += [model(ids[:, t : t + 1], caches=caches) for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), rtol=0, atol=ATOL_EXACT)


def test_the_spec_reads_each_feature():
    d = hf_config("gemma3").to_dict()
    cfg = spec_for(d).config_from_hf(d)
    assert cfg.layer_windows == (WINDOW, WINDOW, None) and cfg.qk_norm and cfg.post_norms
    assert cfg.local_rope == (10000.0, None) and cfg.rope_scaling["factor"] == 2.0
    assert cfg.attn_scale == pytest.approx(24**-0.5) and cfg.embed_scale == pytest.approx(8.0)
    q = spec_for(hf_config("qwen2").to_dict()).config_from_hf(hf_config("qwen2").to_dict())
    assert q.attention_bias and q.out_bias is False and q.layer_windows == (None, WINDOW, WINDOW)
    assert len({s.name for s in SPECS}) == len(SPECS)


@pytest.mark.parametrize("change,named", [
    ({"model_type": "mamba"}, "'mamba'.*supported: .*gemma3_text"),
    ({"model_type": "gemma3"}, "multimodal"),
    ({"hidden_activation": "relu", "hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
])  # fmt: skip
def test_unsupported_configs_are_named_not_misread(change, named):
    d = {**hf_config("gemma2").to_dict(), **change}
    with pytest.raises(UnsupportedModelError, match=named):
        spec_for(d).config_from_hf(d)


def test_a_gemma_config_is_not_read_as_llama():
    # the fields a Llama reads are all there; the spec must still be Gemma's
    d = hf_config("gemma2").to_dict()
    assert spec_for(d).name == "gemma2" and spec_for(d).config_from_hf(d).post_norms


@pytest.mark.parametrize("q_pos,k_pos", [
    (range(0, 12), range(0, 12)),  # one device's own square
    (range(12, 24), range(0, 12)),  # a later device attending to an earlier one
    (list(range(0, 4)) + list(range(20, 24)), range(4, 20)),  # zigzag
])  # fmt: skip
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_windowed_attention_by_runs_equals_the_masked_reference(q_pos, k_pos, softcap):
    from astra.models.attention import softcapped_attention_lse

    q_pos, k_pos = torch.tensor(list(q_pos)), torch.tensor(list(k_pos))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, len(q_pos), 8, generator=g)
    k, v = torch.randn(2, 1, 2, len(k_pos), 8, generator=g)
    out, lse = attend_positions(q, k, v, q_pos, k_pos, True, WINDOW, softcap)
    mask = causal_mask(q_pos, k_pos, WINDOW)
    ref, ref_lse = softcapped_attention_lse(q, k, v, mask, softcap or 1e9)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL_EXACT)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=ATOL_EXACT)


def _exact_codebooks_(astra, x) -> None:
    """Every codebook holds exactly the vectors it will quantize (G=1, K >= tokens)."""
    recorded = astra.record_quant_inputs(lambda: astra.forward_hidden(x, None))
    for quantizer, parts in zip(astra.quantizers, recorded):
        for codebook, samples in zip(quantizer.codebooks, parts):
            embed = torch.full_like(codebook.embed, 1e3)  # unused codes far away
            embed[0, : samples.shape[0]] = samples
            codebook.embed.copy_(embed)


@torch.no_grad()
@pytest.mark.parametrize("point", ["kv", "hidden"])
def test_astra_with_exact_codes_equals_one_device(family_dir, point):
    _, _, path = family_dir
    model = load_model(path)
    ids = torch.randint(0, VOCAB, (1, 20))
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point=point, num_groups=1, codebook_size=64)
    )
    x = astra.model.embed(ids)
    _exact_codebooks_(astra, x)
    out = astra.model.head(astra.forward_hidden(x, PlacementConfig(4)))
    torch.testing.assert_close(out, model(ids), rtol=0, atol=ATOL_EXACT)


def _calibrate_(astra, x) -> None:
    """Training-free codebooks from the model's own activations on x (3 Lloyd iterations)."""
    for quantizer, parts in zip(
        astra.quantizers, astra.record_quant_inputs(lambda: astra.forward_hidden(x, None))
    ):
        for codebook, samples in zip(quantizer.codebooks, parts):
            codebook.kmeans_init_(samples, num_iters=3, seed=0)


def _lockstep(astra, x, num_devices, method, kind="contiguous", exchange="auto", loss=None):
    seq = build_sequence_layout(x.shape[1], PlacementConfig(num_devices, kind=kind), "none")

    def fn(rank, world_size, comm):
        local = share_weights_copy(astra.model)
        with torch.no_grad():
            return rank_forward(rank, world_size, comm, local, astra.quantizers, x, seq,
                                method=method, exchange=exchange, loss=loss)

    outs, _, _ = run_lockstep(fn, num_devices, LinkConfig(bandwidth_mbps=10.0, latency_ms=0.0))
    return seq, outs


@torch.no_grad()
@pytest.mark.parametrize("kind,exchange", [
    ("contiguous", "stream"), ("zigzag", "stream"), ("contiguous", "all-gather"),
])  # fmt: skip
def test_runtime_equals_one_device_at_full_precision_and_the_simulation_with_codes(
    family_dir, kind, exchange
):
    _, _, path = family_dir
    model = load_model(path)
    x = model.embed(torch.randint(0, VOCAB, (1, 24)))
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=2, codebook_size=16)
    )
    _calibrate_(astra, x)
    reference = astra.forward_hidden(x, None)  # the base model's own blocks
    simulated = astra.forward_hidden(x, PlacementConfig(3, kind=kind))
    for method, expected, atol in (("sp-fp32", reference, ATOL_EXACT),
                                   ("astra", simulated, ATOL_RUNTIME)):  # fmt: skip
        seq, outs = _lockstep(astra, x, 3, method, kind, exchange)
        for rank, out in enumerate(outs):
            idx = torch.nonzero(seq.device_of_token == rank).flatten()
            torch.testing.assert_close(out, expected[:, idx], rtol=0, atol=atol)


@torch.no_grad()
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_lost_packets_of_a_windowed_model_are_the_same_in_simulation_and_runtime(
    family, tmp_path
):
    """Only the tokens a window reaches travel, in packets; the simulation loses exactly the
    packets the runtime loses (same tokens per packet)."""
    from astra.net.link import LossModel
    from astra.net.packets import HEADER, PacketChannel, PacketFormat

    save_tiny(family, tmp_path)
    model = load_model(tmp_path)
    x = model.embed(torch.randint(0, VOCAB, (1, 24)))
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=2, codebook_size=16)
    )
    _calibrate_(astra, x)
    # 16 bits per token: packets of 2 tokens
    loss = PacketChannel(LossModel(0.3, seed=3), PacketFormat(mtu=HEADER.size + 4))
    simulated = astra.forward_hidden(x, PlacementConfig(3), loss=loss)
    assert (simulated - astra.forward_hidden(x, PlacementConfig(3))).abs().max() > 1e-4
    seq, outs = _lockstep(astra, x, 3, "astra", loss=loss)
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, simulated[:, idx], rtol=0, atol=ATOL_RUNTIME)


def test_sliding_windows_send_codes_only_where_a_window_reaches():
    from astra.parallel.engine import build_rank_layout

    # 4 devices x 8 tokens: with a 6-token window device 3 needs only device 2's codes
    seq = build_sequence_layout(32, PlacementConfig(4), "none")
    layouts = [build_rank_layout(seq, r, 4, causal=True) for r in range(4)]
    assert layouts[3].senders_within(None) == [0, 1, 2]
    assert layouts[3].senders_within(WINDOW) == [2]
    assert layouts[0].consumers_within(WINDOW) == [1]
    assert layouts[0].consumers_within(9) == [1]  # query 16 - key 7 = 9: just outside
    assert layouts[0].consumers_within(10) == [1, 2]  # ... and inside a 10-token window
    # ... and only the tokens a window reaches: device 0's last 5 (positions 3..7)
    trimmed = layouts[1].for_window(WINDOW)
    assert trimmed.send_positions[0].tolist() == [3, 4, 5, 6, 7]
    assert trimmed.send_counts == [5, 5, 5, 0]  # nobody holds a token after device 3's
    assert trimmed.send_local.tolist() == [3, 4, 5, 6, 7]  # device 1's local indices


def _tokenizer_dir(path):
    from astra.hub import models_dir

    tok_dir = models_dir() / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("needs the smollm2-135m tokenizer (astra models prepare smollm2-135m)")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            (path / name).write_bytes((tok_dir / name).read_bytes())
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 49152


@pytest.mark.parametrize("family", WINDOWED)
def test_astra_run_in_processes_on_each_family(family, tmp_path, monkeypatch):
    """`astra run`'s library path on two real worker processes: full-precision sequence
    parallelism greedily decodes the same tokens as one device (prefill, the sliding-window
    exchange and decoding on the last device all exact), and ASTRA runs with codebooks."""
    from astra import runner
    from astra.runner import RunConfig, run_inference

    save_tiny(family, tmp_path / "model", vocab=49152)
    _tokenizer_dir(tmp_path / "model")
    monkeypatch.setattr(runner, "default_artefact", lambda model_dir, cfg: tmp_path / "cb")
    config = RunConfig(model=str(tmp_path / "model"), devices=2, tokens=40, new_tokens=4,
                       methods=("single", "astra", "sp-fp32"), mode="processes",
                       bandwidth_mbps=float("inf"), latency_ms=0.0)
    rows = {r["method"]: r for r in run_inference(config, progress=False, log=lambda m: None)[
        "records"]}
    assert rows["sp-fp32"]["generated_ids"] == rows["single"]["generated_ids"]
    assert len(rows["astra"]["generated_ids"]) == 4


@torch.no_grad()
def test_the_kv_point_codes_keys_after_the_qk_norm_and_before_rope(family_dir):
    """Gemma 3: the "kv" quantization point sits after the per-head k-norm (the codebook
    sees the normed keys) and before RoPE (a receiver rotates rebuilt keys to the sender's
    positions), for every family: what the quantizer records is project_kv's output."""
    family, _, path = family_dir
    model = load_model(path)
    attn = model.blocks[0].attn
    astra = apply_astra(copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=1,
                                                          codebook_size=8))
    x = torch.randn(1, 5, model.config.dim)
    recorded_k = astra.quantizers[0].inputs(attn, x)[0]  # (1, 5, Dkv): keys as quantized
    raw = attn.k_proj(x).view(1, 5, -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, 5, hd)
    normed = raw if attn.k_norm is None else attn.k_norm(raw)
    assert (attn.k_norm is not None) == (family == "gemma3")
    expected = normed.transpose(1, 2).reshape(1, 5, -1)  # (1, 5, Hkv*hd): heads side by side
    torch.testing.assert_close(recorded_k, expected, rtol=0, atol=0)


def test_astra_models_families_lists_every_spec(capsys):
    from astra.cli.main import main

    assert main(["models", "families"]) == 0
    out = capsys.readouterr().out
    for spec in SPECS:
        assert spec.name in out and spec.model_types[0] in out


def test_each_spec_names_its_class_token_handling():
    """ASTRA's default class-token handling is the family's, not a switch on its kind: the
    image encoders, whose output pools a class token, distribute it (the paper's DCT)."""
    from astra.parallel.config import CLASS_TOKEN_MODES

    for spec in SPECS:
        assert spec.class_tokens in CLASS_TOKEN_MODES, spec.name
        pools_a_class_token = getattr(spec.model_cls, "modality", None) == "image"
        assert (spec.class_tokens == "distributed") == pools_a_class_token, spec.name
