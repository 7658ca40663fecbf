"""ASTRA's simulation, per-rank runtime and lockstep mode against single-process references.

Tolerances: fp32 everywhere. Paths that should be mathematically identical to full precision
(exact codebooks) are held to atol 1e-5; the runtime against the simulation to atol 1e-4 (the
same maths on different tensor shapes rounds differently).
"""

from __future__ import annotations

import copy

import pytest
import torch

from astra.models.decoder import Decoder, DecoderConfig
from astra.models.gpt2 import GPT2, GPT2Config
from astra.models.vit import ViT, ViTConfig
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.parallel.config import AstraConfig
from astra.parallel.engine import build_sequence_layout, expand_class_tokens, rank_forward
from astra.parallel.placement import (
    CausalCost,
    PlacementConfig,
    assign_tokens,
    causal_balanced_sizes,
    fit_causal_cost,
    split_sizes,
)
from astra.parallel.quantizer import set_search_
from astra.parallel.runtime import (
    RankAttention,
    _attend_lse,
    attend_counted_keys,
    distinct_code_share,
    merge_partials,
    plain_attention,
)
from astra.parallel.simulate import apply_astra

ATOL_EXACT = 1e-5
ATOL_RUNTIME = 1e-4


def tiny_llama(seed: int = 0, num_layers: int = 2) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=97,
        dim=48,
        num_layers=num_layers,
        num_heads=6,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=96,
        tie_word_embeddings=True,
    )
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_gpt2(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(vocab_size=97, dim=32, num_layers=2, num_heads=4, max_positions=64,
                            mlp_dim=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_vit(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        dim=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        image_size=24,
        patch_size=4,
        use_layer_scale=True,
    )
    model = ViT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def exact_codebooks_(astra, run) -> None:
    """Make every codebook contain the exact vectors it will be asked to quantize (G=1)."""
    recorded = astra.record_quant_inputs(run)
    for quantizer, parts in zip(astra.quantizers, recorded):
        for codebook, samples in zip(quantizer.codebooks, parts):
            k = codebook.embed.shape[1]
            assert samples.shape[0] <= k, "test needs K >= number of recorded vectors"
            embed = torch.full_like(codebook.embed, 1e3)  # unused codes far away
            embed[0, : samples.shape[0]] = samples
            codebook.embed.copy_(embed)


def calibrate_(astra, run, seed=0) -> None:
    for quantizer, parts in zip(astra.quantizers, astra.record_quant_inputs(run)):
        for codebook, samples in zip(quantizer.codebooks, parts):
            codebook.kmeans_init_(samples, num_iters=5, seed=seed)


def test_split_sizes_even_weighted_and_errors():
    assert split_sizes(10, 4) == [3, 3, 2, 2] or sorted(split_sizes(10, 4)) == [2, 2, 3, 3]
    assert sum(split_sizes(1000, 3, weights=(1.0, 2.0, 1.0))) == 1000
    assert split_sizes(1000, 3, weights=(1.0, 2.0, 1.0))[1] == 500
    with pytest.raises(ValueError, match="cannot split 3 tokens over 4 devices"):
        split_sizes(3, 4)
    with pytest.raises(ValueError, match="got 2 device weights for 3 devices"):
        PlacementConfig(3, weights=(1.0, 1.0))
    dev = assign_tokens(12, PlacementConfig(3, kind="random", seed=1))
    assert torch.bincount(dev).tolist() == [4, 4, 4]
    zig = assign_tokens(12, PlacementConfig(3, kind="zigzag"))
    assert zig.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 1, 1, 0, 0]


@pytest.mark.parametrize("point", ["hidden", "kv"])
def test_simulation_with_exact_codes_equals_full_precision_decoder(point):
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        ref = model(ids)
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point=point, num_groups=1, codebook_size=64)
    )
    x = astra.model.embed(ids)
    exact_codebooks_(astra, lambda: astra.forward_hidden(x, None))
    with torch.no_grad():
        out = astra.model.head(astra.forward_hidden(x, PlacementConfig(4)))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL_EXACT)


@pytest.mark.parametrize("class_tokens", ["distributed", "single"])
def test_simulation_with_exact_codes_equals_full_precision_vit(class_tokens):
    model = tiny_vit()
    pixels = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        ref = model(pixels)
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(num_groups=1, codebook_size=64, class_tokens=class_tokens)
    )
    x = astra.model.embed(pixels)
    exact_codebooks_(astra, lambda: astra.forward_hidden(x, None))
    with torch.no_grad():
        out = astra.model.head(astra.forward_hidden(x, PlacementConfig(3)))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL_EXACT)


def test_quantized_remote_tokens_change_the_output_and_one_device_does_not():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16))
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=2, codebook_size=4)
    )
    x = astra.model.embed(ids)
    calibrate_(astra, lambda: astra.forward_hidden(x, None))
    with torch.no_grad():
        ref = model(ids)
        one = astra.model.head(astra.forward_hidden(x, PlacementConfig(1)))
        four = astra.model.head(astra.forward_hidden(x, PlacementConfig(4)))
    torch.testing.assert_close(one, ref, rtol=0, atol=ATOL_EXACT)
    assert (four - ref).abs().max() > 1e-3  # 2-bit codes are far from exact
    # the first device's tokens see no remote token in a causal model: they stay exact
    torch.testing.assert_close(four[:, :4], ref[:, :4], rtol=0, atol=ATOL_EXACT)


def test_naq_noise_only_in_training():
    model = tiny_vit()
    astra = apply_astra(model, AstraConfig(num_groups=4, codebook_size=8))
    x = astra.model.embed(torch.randn(2, 3, 24, 24))
    recorded = astra.record_quant_inputs(lambda: astra.forward_hidden(x, None))
    for quantizer, parts in zip(astra.quantizers, recorded):
        cb, noise = quantizer.codebooks[0], quantizer.noises[0]
        cb.kmeans_init_(parts[0], num_iters=3)
        noise.fit_(parts[0] - cb.decode(cb.encode(parts[0])))
    astra.eval()
    with torch.no_grad():
        a = astra.forward_hidden(x, PlacementConfig(2))
        b = astra.forward_hidden(x, PlacementConfig(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    astra.train()
    for q in astra.quantizers:  # freeze the EMA so only the noise differs between passes
        q.codebooks[0].eval()
    with torch.no_grad():
        c = astra.forward_hidden(x, PlacementConfig(2))
    assert (c - a).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_stacks_heads_exactly(dtype):
    # unmasked GQA reads each kv head once (query heads stacked as rows): same numbers as
    # repeating the kv heads, and the log-sum-exp of every query head
    torch.manual_seed(0)
    q = torch.randn(1, 6, 7, 8, dtype=dtype)[:, :, 1:]  # a non-contiguous slice of queries
    k, v = torch.randn(1, 2, 9, 8, dtype=dtype), torch.randn(1, 2, 9, 8, dtype=dtype)
    out, lse = _attend_lse(q, k, v, None)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    ref = plain_attention(q, kr, vr, None)
    ref_lse = torch.logsumexp((q.float() @ kr.float().transpose(-1, -2)) * 8**-0.5, dim=-1)
    tol = ATOL_EXACT if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol)


def test_attention_without_the_flash_kernel_keeps_lse_in_float32():
    # the generic path (GPUs, other dtypes): half-precision inputs, float32 scores and lse
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True  # every row sees a key
    out, lse = _attend_lse(q.half(), k.half(), v.half(), mask)
    ref_out, ref_lse = _attend_lse(q, k, v, mask)  # float32, the CPU flash kernel
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=1e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-2)
    empty, empty_lse = _attend_lse(q[:, :, :0], k, v, None)  # zero query rows: no kernel call
    assert empty.shape == (1, 2, 0, 8) and empty_lse.shape == (1, 2, 0)


def test_lse_merge_equals_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 5, 8)
    k1, v1 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    k2, v2 = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    m2 = torch.rand(5, 6) > 0.5
    m2[0] = False  # a row with no visible key in the second part
    o1, l1 = _attend_lse(q, k1, v1, None)
    o2, l2 = _attend_lse(q, k2, v2, m2)
    merged = merge_partials(o1, l1, o2, l2)
    mask = torch.cat([torch.ones(5, 3, dtype=torch.bool), m2], dim=1)
    ref = plain_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), mask)
    torch.testing.assert_close(merged, ref, rtol=0, atol=ATOL_EXACT)


def _lockstep_vs_simulation(
    model, inputs_x, astra_cfg, num_devices, method="astra", overlap=True, kind="contiguous",
    loss=None, exchange="auto", latency_ms=20.0, search=None, shares=None,
):
    """`shares`: a dict, filled with each rank's distinct_code_share (None: no merging)."""
    astra = apply_astra(copy.deepcopy(model), astra_cfg)
    calibrate_(astra, lambda: astra.forward_hidden(inputs_x, None))
    set_search_(astra.quantizers, search)  # the simulation's and the runtime's senders alike
    placement = PlacementConfig(num_devices, kind=kind)
    with torch.no_grad():
        sim = astra.forward_hidden(inputs_x, placement if method == "astra" else None, loss=loss)
    seq = build_sequence_layout(inputs_x.shape[1], placement, astra.class_tokens)
    x_full = expand_class_tokens(inputs_x, seq.num_replicas)

    def fn(rank, world_size, comm):
        local = share_weights_copy(astra.model)
        with torch.no_grad():
            out = rank_forward(
                rank,
                world_size,
                comm,
                local,
                astra.quantizers,
                x_full,
                seq,
                method=method,
                overlap=overlap,
                loss=loss,
                exchange=exchange,
            )
        if shares is not None:
            shares[rank] = distinct_code_share(local)
        return out

    link = LinkConfig(bandwidth_mbps=10.0, latency_ms=latency_ms)
    outs, clocks, computes = run_lockstep(fn, num_devices, link)
    return sim, seq, outs, clocks, computes


@pytest.mark.parametrize("point", ["hidden", "kv"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag", "random"])
@pytest.mark.parametrize("exchange", ["stream", "all-gather"])
def test_lockstep_runtime_matches_simulation_decoder(point, overlap, kind, exchange):
    model = tiny_llama()
    x = model.embed(torch.randint(0, 97, (1, 19))).detach()
    cfg = AstraConfig(quant_point=point, num_groups=2, codebook_size=16)
    sim, seq, outs, clocks, _ = _lockstep_vs_simulation(
        model, x, cfg, 3, overlap=overlap, kind=kind, exchange=exchange
    )
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)
    # at least one 20 ms latency (all-gather: one per block, 2 blocks)
    assert max(clocks) >= (2 if exchange == "all-gather" else 1) * 0.020


def test_lockstep_runtime_matches_simulation_with_the_pca_search(monkeypatch):
    """`--search pca` (the default where bf16 is not native): the senders' first pass picks
    the same codes in the runtime as in the simulation, so both attend to the same keys."""
    import astra.vq.codebook as codebook

    searched = []
    nearest_pca = codebook._nearest_pca
    monkeypatch.setattr(codebook, "_nearest_pca", lambda *a: searched.append(1) or nearest_pca(*a))
    model = tiny_llama()  # hidden width 64: wide enough for the pca pass (MIN_PCA_DIM)
    x = model.embed(torch.randint(0, 97, (1, 19))).detach()
    cfg = AstraConfig(quant_point="hidden", num_groups=1, codebook_size=16)
    sim, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 3, search="pca")
    assert searched  # the pca pass ran
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)


def test_streaming_pays_latency_per_device_boundary_not_per_block():
    """Causal prefill, contiguous placement: with streaming, rank r waits only for ranks < r,
    which ran ahead, so the last rank finishes after about (N-1) latencies of link time, not
    one per block as with an all-gather (module doc of astra.parallel.runtime)."""
    model = tiny_llama(num_layers=6)
    x = model.embed(torch.randint(0, 97, (1, 16))).detach()
    cfg = AstraConfig(quant_point="kv", num_groups=2, codebook_size=16)
    latency_s = 0.5  # virtual time (lockstep): large, so the tiny model's compute is negligible
    clocks = {}
    for exchange in ("stream", "all-gather"):
        sim, seq, outs, clocks[exchange], _ = _lockstep_vs_simulation(
            model, x, cfg, 2, exchange=exchange, latency_ms=latency_s * 1e3
        )
        torch.testing.assert_close(outs[1], sim[:, 8:], rtol=0, atol=ATOL_RUNTIME)
    assert latency_s <= clocks["stream"][1] < 2 * latency_s  # one boundary
    assert clocks["stream"][0] < 0.5 * latency_s  # rank 0 never waits
    assert min(clocks["all-gather"]) >= 6 * latency_s  # six blocks, six latencies


@pytest.mark.parametrize("class_tokens", ["distributed", "single"])
def test_lockstep_runtime_matches_simulation_vit(class_tokens):
    model = tiny_vit()
    x = model.embed(torch.randn(1, 3, 24, 24)).detach()
    cfg = AstraConfig(num_groups=4, codebook_size=16, class_tokens=class_tokens)
    sim_pooled, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 4)
    # the simulation pools the replicas; rebuild the same from the ranks' local replicas
    if seq.num_replicas:
        cls = torch.stack([out[:, 0] for out in outs]).mean(0)
        torch.testing.assert_close(cls, sim_pooled[:, 0], rtol=0, atol=ATOL_RUNTIME)
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        content = idx >= seq.num_replicas
        # content tokens: expanded index i corresponds to pooled-sequence index i - N + 1
        shift = seq.num_replicas - 1 if seq.num_replicas else 0
        torch.testing.assert_close(
            out[:, content], sim_pooled[:, idx[content] - shift], rtol=0, atol=ATOL_RUNTIME
        )


@pytest.mark.parametrize("kv_heads", [6, 2])  # plain and grouped-query attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counted_keys_equal_attention_to_every_token(kv_heads, dtype):
    # remote tokens with the same codes have the same k and v: attending to each distinct one
    # once, its score raised by log(count), is attention to every token
    torch.manual_seed(0)
    q = torch.randn(1, 6, 7, 8, dtype=dtype)
    distinct_k = torch.randn(1, kv_heads, 5, 8, dtype=dtype)
    distinct_v = torch.randn(1, kv_heads, 5, 8, dtype=dtype)
    codes = torch.tensor([0, 3, 3, 1, 0, 0, 4, 3, 2, 0, 0])  # every key once or more
    counts = torch.bincount(codes).float()
    out, lse = attend_counted_keys(q, distinct_k, distinct_v, counts)
    ref, ref_lse = _attend_lse(q, distinct_k[:, :, codes], distinct_v[:, :, codes], None)
    tol = ATOL_EXACT if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol)
    unweighted, _ = attend_counted_keys(q, distinct_k, distinct_v, torch.ones(5))
    assert (unweighted.float() - ref.float()).abs().max() > 10 * tol  # the counts matter


@pytest.mark.parametrize("groups,dtype", [
    (1, torch.float32), (2, torch.float32), (1, torch.bfloat16)
])
def test_lockstep_vit_attends_each_distinct_remote_code_once(groups, dtype):
    # a tiny codebook (K=4): most remote tokens share their codes with others, so the runtime
    # attends to a few distinct keys per block; the outputs still equal the simulation's
    model = tiny_vit().to(dtype)
    x = model.embed(torch.randn(1, 3, 24, 24, dtype=dtype)).detach()
    cfg = AstraConfig(num_groups=groups, codebook_size=4, class_tokens="distributed")
    shares: dict[int, float | None] = {}
    sim, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 2, shares=shares)
    assert all(0 < shares[rank] < 1 for rank in range(2)), shares  # the merging path ran
    shift = seq.num_replicas - 1
    tol = ATOL_RUNTIME if dtype == torch.float32 else 5e-2
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        content = idx >= seq.num_replicas
        torch.testing.assert_close(
            out[:, content].float(), sim[:, idx[content] - shift].float(), rtol=0, atol=tol
        )


def test_only_position_free_attention_merges_duplicate_codes():
    # RoPE keys (Llama) depend on each token's position, and so does a causal mask over keys
    # that are not all earlier: merging needs keys from codes alone, all visible
    from astra.parallel.codecs import CodesCodec, FloatCodec
    from astra.parallel.engine import build_rank_layout

    def merges(model, rank, exchange="auto", codec=None, kind="contiguous"):
        astra = apply_astra(copy.deepcopy(model), AstraConfig(num_groups=1, codebook_size=4))
        causal = getattr(model, "causal", False)
        seq = build_sequence_layout(8, PlacementConfig(2, kind=kind), "none")
        layout = build_rank_layout(seq, rank, 2, causal)
        inner = astra.model.blocks[0].attn
        inner = getattr(inner, "inner", inner)  # unwrapped, as install_rank_attention does
        codec = codec or CodesCodec(astra.quantizers[0])
        attn = RankAttention(inner, codec, layout, comm=None, exchange=exchange)
        return attn.count_duplicates

    assert merges(tiny_vit(), 0) and merges(tiny_vit(), 1)
    assert not merges(tiny_vit(), 0, codec=FloatCodec(torch.float32))  # floats: no codes
    assert not merges(tiny_llama(), 1)  # RoPE
    assert merges(tiny_gpt2(), 1)  # learned positions, every remote key earlier
    assert merges(tiny_gpt2(), 1, exchange="all-gather")  # rank 1's only sender is earlier
    # zigzag: each rank holds an early and a late chunk, so some remote keys are masked
    assert not merges(tiny_gpt2(), 1, exchange="all-gather", kind="zigzag")


@pytest.mark.parametrize("exchange,kind", [
    ("auto", "contiguous"), ("all-gather", "contiguous"), ("all-gather", "zigzag")
])
def test_lockstep_gpt2_attends_each_distinct_earlier_code_once(exchange, kind):
    # GPT-2 has no RoPE: on the ranks whose remote keys are all earlier the runtime merges
    # duplicate codes (K=4: most are), the others mask per token; both equal the simulation
    model = tiny_gpt2()
    x = model.embed(torch.randint(0, 97, (1, 21)), torch.arange(21)).detach()
    cfg = AstraConfig(quant_point="hidden", num_groups=1, codebook_size=4)
    shares: dict[int, float | None] = {}
    sim, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 3, exchange=exchange,
                                                   kind=kind, shares=shares)
    if kind == "contiguous":  # ranks 1 and 2 merge (rank 0 has no earlier keys)
        assert shares[0] is None and all(0 < shares[r] < 1 for r in (1, 2)), shares
    else:  # zigzag: every rank holds an early and a late chunk, so no rank merges
        assert all(share is None for share in shares.values()), shares
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)


def test_full_precision_sequence_parallel_is_exact():
    model = tiny_llama()
    x = model.embed(torch.randint(0, 97, (1, 13))).detach()
    cfg = AstraConfig(quant_point="kv", num_groups=1, codebook_size=8)
    ref, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 2, method="sp-fp32")
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, ref[:, idx], rtol=0, atol=ATOL_RUNTIME)


def _gloo_worker(rank, world_size, group, model, quantizers, x_full, seq, method):
    from astra.net.comm import Communicator

    comm = Communicator(group, LinkConfig(bandwidth_mbps=100.0, latency_ms=5.0), timeout_s=60)
    with torch.no_grad():
        out = rank_forward(rank, world_size, comm, model, quantizers, x_full, seq, method=method)
    return out, comm.stats.to_dict()


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_runtime_matches_simulation(world_size):
    from astra.net.launch import spawn

    model = tiny_llama()
    x = model.embed(torch.randint(0, 97, (1, 22))).detach()
    astra = apply_astra(
        copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=2, codebook_size=16)
    )
    calibrate_(astra, lambda: astra.forward_hidden(x, None))
    placement = PlacementConfig(world_size)
    with torch.no_grad():
        sim = astra.forward_hidden(x, placement)
    seq = build_sequence_layout(x.shape[1], placement, "none")
    results = spawn(
        _gloo_worker,
        world_size,
        args=(astra.model, astra.quantizers, x, seq, "astra"),
        timeout_s=120,
    )
    for rank, (out, stats) in enumerate(results):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)
        # 2 blocks, each streaming 2*2 codes of 4 bits per sent token to the later ranks only
        sent_tokens = int((seq.device_of_token == rank).sum())
        later = world_size - 1 - rank
        assert stats["bytes_sent"] == 2 * later * ((sent_tokens * 4 * 4 + 7) // 8)


@pytest.mark.parametrize("q_pos,k_pos", [
    (list(range(0, 6)), list(range(0, 6))),  # one diagonal run
    ([0, 1, 2, 9, 10, 11], [0, 1, 2, 9, 10, 11]),  # zigzag-like local runs
    ([6, 7, 8], [0, 1, 2, 3, 4, 5]),  # keys all earlier
    ([0, 1, 2], [3, 4, 5]),  # keys all later: nothing visible
    ([0, 3, 4, 7], [1, 2, 4, 5, 6, 8]),  # interleaved runs: explicit mask
    (list(range(20, 31)), list(range(20, 31))),  # a diagonal run cut into stripes (of 4 here)
    (list(range(0, 9)) + [20, 21], list(range(0, 12)) + [20, 21]),  # stripes + earlier keys
])
def test_causal_block_attention_equals_masked_attention(q_pos, k_pos, monkeypatch):
    from astra.parallel import runtime
    from astra.parallel.runtime import attend_positions

    monkeypatch.setattr(runtime, "CAUSAL_STRIPE", 4)  # stripes at test size (1024 rows: 128)
    torch.manual_seed(0)
    qp, kp = torch.tensor(q_pos), torch.tensor(k_pos)
    q = torch.randn(1, 4, len(q_pos), 8)
    k, v = torch.randn(1, 2, len(k_pos), 8), torch.randn(1, 2, len(k_pos), 8)
    out, lse = attend_positions(q, k, v, qp, kp, causal=True)
    ref_out, ref_lse = _attend_lse(q, k, v, qp[:, None] >= kp[None, :])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=ATOL_EXACT)
    visible = (qp[:, None] >= kp[None, :]).any(-1)
    torch.testing.assert_close(lse[..., visible], ref_lse[..., visible], rtol=0, atol=ATOL_EXACT)
    assert torch.isneginf(lse[..., ~visible]).all()


@pytest.mark.parametrize("tokens", [7, 8, 21])  # one stripe; exactly two; a ragged last one
def test_single_device_causal_kernel_equals_the_masked_model(tokens, monkeypatch):
    """The single-device reference's striped causal kernel (grouped-query heads, a KV cache
    filled on the way) gives the model's own masked forward, and the same cache."""
    from astra.models import causal_mask
    from astra.models.attention import KVCache
    from astra.parallel import runtime
    from astra.parallel.runtime import restore_attention_, use_causal_kernel_

    monkeypatch.setattr(runtime, "CAUSAL_STRIPE", 4)  # stripes at test size (1024 rows: 128)
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, tokens))
    positions = torch.arange(tokens)
    mask = causal_mask(positions, positions)
    with torch.no_grad():
        ref_caches = [KVCache() for _ in model.blocks]
        x = ref = model.embed(ids, positions)
        for block, cache in zip(model.blocks, ref_caches):
            ref = block(ref, positions, mask, cache=cache)
        use_causal_kernel_(model)
        caches = [KVCache() for _ in model.blocks]
        for block, cache in zip(model.blocks, caches):
            x = block(x, positions, mask, cache=cache)
        restore_attention_(model)
    torch.testing.assert_close(x, ref, rtol=0, atol=ATOL_EXACT)
    for cache, ref_cache in zip(caches, ref_caches):
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=0, atol=ATOL_EXACT)


@pytest.mark.parametrize("kind,parity,family", [
    ("contiguous", 0, "llama"), ("random", 0, "llama"), ("contiguous", 1, "llama"),
    ("contiguous", 0, "gpt2"),  # no RoPE: the remote keys that arrive are merged by code
])
def test_lost_packets_are_dropped_identically_in_simulation_and_runtime(kind, parity, family):
    """The runtime cuts codes into real packets and drops the ones the network loses; the
    simulation predicts the same tokens lost without building bytes."""
    from astra.net.link import LossModel
    from astra.net.packets import HEADER, PacketChannel, PacketFormat

    if family == "llama":
        model = tiny_llama()
        x = model.embed(torch.randint(0, 97, (1, 24))).detach()
    else:
        model = tiny_gpt2()
        x = model.embed(torch.randint(0, 97, (1, 24)), torch.arange(24)).detach()
    point = "kv" if family == "llama" else "hidden"
    cfg = AstraConfig(quant_point=point, num_groups=2, codebook_size=16)
    # 16 bits per token: packets of 2 tokens, so a sender's 8 tokens travel in 4 packets
    fmt = PacketFormat(mtu=HEADER.size + 4, parity_every=parity)
    loss = PacketChannel(LossModel(0.3, seed=3), fmt)
    sim, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 3, kind=kind, loss=loss)
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)
    astra = apply_astra(copy.deepcopy(model), cfg)
    calibrate_(astra, lambda: astra.forward_hidden(x, None))
    with torch.no_grad():
        clean = astra.forward_hidden(x, PlacementConfig(3, kind=kind))
        lossy = astra.forward_hidden(x, PlacementConfig(3, kind=kind), loss=loss)
    assert (clean - lossy).abs().max() > 1e-4  # 30% of remote codes lost changes the output


@pytest.mark.parametrize("cost", [
    CausalCost(cross=1e-3, diagonal=1e-3),
    CausalCost(cross=1e-3),
    CausalCost(cross=5e-4, diagonal=2e-3, encode=0.3, rebuild=0.05),  # SmolLM2-like, streamed
    CausalCost(cross=5e-4, diagonal=2e-3, encode=0.3, rebuild=0.05, last_encodes=True),
])
def test_balanced_placement_equalises_causal_cost(cost):
    sizes = causal_balanced_sizes(1000, 4, cost)
    assert sum(sizes) == 1000
    costs, done = [], 0
    for d, n in enumerate(sizes):
        last = d == 3
        sends = cost.last_encodes or not last
        # the cost model written out independently of CausalCost.of
        costs.append(n * (1 + cost.encode * sends) + cost.diagonal * n * n
                     + cost.cross * done * n + cost.rebuild * done)
        done += n
    even = [cost.of(250, 250 * d, last=d == 3) for d in range(4)]
    assert max(costs) < max(even)
    assert max(costs) / min(costs) < 1.02  # one token of rounding per chunk
    if cost.encode == 0 or cost.last_encodes:
        assert sizes == sorted(sizes, reverse=True)  # later chunks attend more: smaller
    else:
        assert sizes[3] > sizes[2]  # the last device skips the encode: it takes more tokens
    placement = PlacementConfig(4, kind="balanced", cost=cost)
    assert torch.bincount(assign_tokens(1000, placement)).tolist() == sizes


def test_balanced_placement_without_cost_is_refused_or_even():
    assert causal_balanced_sizes(10, 3, CausalCost()) == [4, 3, 3]  # no attention: even split
    with pytest.raises(ValueError, match="CausalCost"):
        assign_tokens(10, PlacementConfig(2, kind="balanced"))
    with pytest.raises(ValueError, match="cross must be a number >= 0, got -0.1"):
        CausalCost(cross=-0.1)


def test_fit_causal_cost_recovers_the_costs_it_was_measured_with():
    # records generated from known per-token costs (ms), as a 4-device contiguous pass would
    # report them: the fit must read the same CausalCost back
    unit, out_proj, enc, diag, cross, rebuild = 2.0, 0.1, 0.6, 0.002, 0.0008, 0.09
    records = []
    for d in range(4):
        n, p = 256, 256 * d
        sends = d < 3
        records.append({
            "tokens": n, "earlier": p, "sends": float(sends),
            "linear": (unit - out_proj) * n, "encode": enc * n * sends,
            "local": diag * n * n, "remote": out_proj * n + cross * n * p, "rebuild": rebuild * p,
        })
    cost = fit_causal_cost(records)
    expected = CausalCost(cross=cross / unit, diagonal=diag / unit, encode=enc / unit,
                          rebuild=rebuild / unit)
    for name in ("cross", "diagonal", "encode", "rebuild"):
        assert getattr(cost, name) == pytest.approx(getattr(expected, name), rel=1e-9), name
    assert not cost.last_encodes
    with pytest.raises(ValueError, match="no earlier tokens"):
        fit_causal_cost(records[1:])


def test_lockstep_runtime_matches_simulation_balanced_placement():
    model = tiny_llama()
    x = model.embed(torch.randint(0, 97, (1, 30))).detach()
    cfg = AstraConfig(quant_point="kv", num_groups=2, codebook_size=16)
    placement = PlacementConfig(3, kind="balanced", cost=CausalCost(cross=0.05, diagonal=0.05))
    astra = apply_astra(copy.deepcopy(model), cfg)
    calibrate_(astra, lambda: astra.forward_hidden(x, None))
    with torch.no_grad():
        sim = astra.forward_hidden(x, placement)
    seq = build_sequence_layout(x.shape[1], placement, "none")
    assert torch.bincount(seq.device_of_token).tolist()[0] > 10  # uneven: first chunk largest

    def fn(rank, world_size, comm):
        with torch.no_grad():
            return rank_forward(
                rank, world_size, comm, share_weights_copy(astra.model), astra.quantizers, x, seq
            )

    outs, _, _ = run_lockstep(fn, 3, LinkConfig(bandwidth_mbps=10.0, latency_ms=20.0))
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, sim[:, idx], rtol=0, atol=ATOL_RUNTIME)


@pytest.mark.parametrize("point", ["hidden", "kv"])
def test_lockstep_runtime_matches_simulation_in_bfloat16(point):
    # the model computes in bf16 (codebooks stay fp32): runtime and simulation agree to bf16
    # rounding (they order the softmax differently: split partials vs one masked pass)
    model = tiny_llama().to(torch.bfloat16)
    x = model.embed(torch.randint(0, 97, (1, 19))).detach()
    cfg = AstraConfig(quant_point=point, num_groups=2, codebook_size=16)
    sim, seq, outs, _, _ = _lockstep_vs_simulation(model, x, cfg, 3)
    for rank, out in enumerate(outs):
        assert out.dtype == torch.bfloat16
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out.float(), sim[:, idx].float(), rtol=0, atol=5e-2)
