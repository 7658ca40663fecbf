"""The paper's baselines in our runtime: tensor, pipeline and block parallelism (§7).

Tolerances: fp32 everywhere; TP and PP must equal the single-device model to atol 1e-4, rtol 0
(same maths, different summation order: partial matmuls summed after the reduce, chunked
attention). PP with fp16 hidden states on the wire to atol 1e-2. BP is latency-only: only its
bytes and its agreement between ranks are checked, never its values against the model.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from astra.models.attention import causal_mask
from astra.models.bert import Bert, BertConfig
from astra.models.decoder import Decoder, DecoderConfig
from astra.models.gpt2 import GPT2, GPT2Config
from astra.models.vit import ViT, ViTConfig
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.parallel.block_parallel import bp_rank_forward, sync_points
from astra.parallel.pipeline import pp_rank_forward, stage_ranges
from astra.parallel.tensor_parallel import apply_tensor_parallel_, tp_rank_forward

ATOL = 1e-4
ATOL_FP16_WIRE = 1e-2
LINK = LinkConfig(bandwidth_mbps=100.0, latency_ms=1.0)
NUM_LAYERS = 3


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def tiny_llama():  # GQA: 4 query heads share 2 kv heads
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=97, dim=32, num_layers=NUM_LAYERS, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=64)
    return _randomise(Decoder(config))


def tiny_vit():  # DINOv2-style, with layer scale
    torch.manual_seed(0)
    return _randomise(ViT(ViTConfig(dim=32, num_layers=NUM_LAYERS, num_heads=4, mlp_dim=64,
                                    image_size=24, patch_size=4, use_layer_scale=True)))


def tiny_gpt2():
    torch.manual_seed(0)
    return _randomise(GPT2(GPT2Config(vocab_size=97, dim=32, num_layers=NUM_LAYERS, num_heads=4,
                                      max_positions=64, mlp_dim=64)))


def tiny_bert():
    torch.manual_seed(0)
    return _randomise(Bert(BertConfig(vocab_size=97, dim=32, num_layers=NUM_LAYERS, num_heads=4,
                                      mlp_dim=66, max_positions=64)))  # 66: uneven MLP split


MODELS = {"llama": tiny_llama, "vit": tiny_vit, "gpt2": tiny_gpt2, "bert": tiny_bert}


def model_and_input(name: str):
    """(model, embedded input x (1, T, D), single-device output model(inputs)).

    Parallel hidden states h are checked as model.head(h) against model(inputs), so the
    reference is the model's own forward (its own positions and mask), plus h itself against
    reference_hidden.
    """
    model = MODELS[name]()
    torch.manual_seed(1)
    inputs = torch.randn(1, 3, 24, 24) if name == "vit" else torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        ref = model(inputs)
        if name == "gpt2":
            x = model.embed(inputs, torch.arange(inputs.shape[1]))
        else:
            x = model.embed(inputs)
    return model, x, ref


def reference_hidden(model, x):
    """Single-device last hidden states (1, T, D) of the embedded sequence x."""
    positions = torch.arange(x.shape[1])
    mask = causal_mask(positions, positions) if model.causal else None
    with torch.no_grad():
        for block in model.blocks:
            x = block(x, positions, mask)
    return x


def _lockstep(fn, model, world_size, *args):
    def rank_fn(rank, world_size, comm):
        local = share_weights_copy(model)
        with torch.no_grad():
            return fn(rank, world_size, comm, local, *args), comm.stats.to_dict()

    results, clocks, _ = run_lockstep(rank_fn, world_size, LINK)
    return [r[0] for r in results], [r[1] for r in results], clocks


def tp_bytes_sent(
    num_tokens: int, dim: int, num_layers: int, world_size: int, element_size: int = 4
) -> int:
    # 2 ring all-reduces of the (T, D) hidden per block; 2(N-1)/N of it leaves each uplink
    per_reduce = round(num_tokens * dim * element_size * 2 * (world_size - 1) / world_size)
    return 2 * num_layers * per_reduce


# ---- tensor parallelism ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_equals_single_device(name):
    model, x, ref = model_and_input(name)
    outs, stats, _ = _lockstep(tp_rank_forward, model, 2, x)
    T, D = x.shape[1:]
    hidden = reference_hidden(model, x)
    for out, st in zip(outs, stats, strict=True):
        torch.testing.assert_close(out, hidden, rtol=0, atol=ATOL)
        torch.testing.assert_close(model.head(out), ref, rtol=0, atol=ATOL)
        assert st["num_messages"] == 2 * NUM_LAYERS
        assert st["bytes_sent"] == tp_bytes_sent(T, D, NUM_LAYERS, 2)
        assert st["phases"]["tp.attn"]["num_messages"] == NUM_LAYERS
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # bit-identical on every rank


@pytest.mark.parametrize(("name", "world_size"), [("llama", 2), ("llama", 3), ("vit", 2)])
def test_tensor_parallel_in_bfloat16_equals_single_device_and_halves_the_bytes(name, world_size):
    # 3 devices cut a GQA group: the kv projections are gathered rows (new weights, bf16 too)
    model, x, _ = model_and_input(name)
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    outs, stats, _ = _lockstep(tp_rank_forward, model, world_size, x)
    T, D = x.shape[1:]
    hidden = reference_hidden(model, x)
    for out, st in zip(outs, stats, strict=True):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), hidden.float(), rtol=0, atol=5e-2)
        assert st["bytes_sent"] == tp_bytes_sent(T, D, NUM_LAYERS, world_size, element_size=2)


def test_tensor_parallel_shards_gqa_heads_and_keeps_the_shared_weights():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local = share_weights_copy(model)
    no_comm = SimpleNamespace(all_reduce_tensor=lambda x: x)  # sharding alone sends nothing
    apply_tensor_parallel_(local, rank=1, world_size=2, comm=no_comm)
    attn, mlp = local.blocks[0].attn, local.blocks[0].mlp
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
    assert attn.o_proj.weight.shape == (32, 16) and mlp.down_proj.weight.shape == (32, 32)
    torch.testing.assert_close(attn.k_proj.weight, model.blocks[0].attn.k_proj.weight[8:16])
    for k, v in model.state_dict().items():  # the lockstep-shared original is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already sharded"):
        apply_tensor_parallel_(local, 1, 2, no_comm)


@pytest.mark.parametrize("world_size", [5, 8])
def test_tensor_parallel_bad_device_count_names_the_valid_ones(world_size):
    with pytest.raises(ValueError, match=r"num_heads=4; valid device counts: 1..4"):
        apply_tensor_parallel_(tiny_llama(), 0, world_size, None)


@pytest.mark.parametrize("world_size", [3, 4])
def test_tensor_parallel_uneven_head_split_equals_single_device(world_size):
    # 4 query heads, 2 kv heads: 3 devices cut a GQA group, 4 devices replicate kv heads
    model, x, _ = model_and_input("llama")
    outs, _, _ = _lockstep(tp_rank_forward, model, world_size, x)
    hidden = reference_hidden(model, x)
    for out in outs:
        torch.testing.assert_close(out, hidden, rtol=0, atol=ATOL)


def _gloo_tp_worker(rank, world_size, group, model, x):
    from astra.net.comm import Communicator

    comm = Communicator(group, LinkConfig(bandwidth_mbps=1000.0, latency_ms=1.0), timeout_s=60)
    with torch.no_grad():
        out = tp_rank_forward(rank, world_size, comm, model, x)
    return out, comm.stats.to_dict()


def test_tensor_parallel_over_real_gloo_processes():
    from astra.net.launch import spawn

    model, x, ref = model_and_input("llama")
    results = spawn(_gloo_tp_worker, 2, args=(model, x), timeout_s=120)
    T, D = x.shape[1:]
    for out, st in results:
        torch.testing.assert_close(model.head(out), ref, rtol=0, atol=ATOL)
        assert st["bytes_sent"] == tp_bytes_sent(T, D, NUM_LAYERS, 2)
        assert st["num_messages"] == 2 * NUM_LAYERS


# ---- pipeline parallelism -------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize(("name", "num_chunks"),
                         [("llama", 1), ("llama", 3), ("gpt2", 3), ("vit", 1), ("bert", 1)])
def test_pipeline_equals_single_device(name, num_stages, num_chunks):
    model, x, ref = model_and_input(name)
    outs, stats, _ = _lockstep(pp_rank_forward, model, num_stages, x, num_chunks, torch.float32)
    assert all(out is None for out in outs[:-1])
    torch.testing.assert_close(outs[-1], reference_hidden(model, x), rtol=0, atol=ATOL)
    torch.testing.assert_close(model.head(outs[-1]), ref, rtol=0, atol=ATOL)
    T, D = x.shape[1:]
    for st in stats[:-1]:  # every stage but the last sends the whole (T, D) once, in chunks
        assert st["bytes_sent"] == T * D * 4
        assert st["phases"]["pp"]["bytes_sent"] == T * D * 4
    assert stats[-1]["bytes_sent"] == 0


def test_pipeline_fp16_wire_halves_the_bytes():
    model, x, ref = model_and_input("llama")
    outs, stats, _ = _lockstep(pp_rank_forward, model, 2, x, 2, torch.float16)
    torch.testing.assert_close(model.head(outs[-1]), ref, rtol=0, atol=ATOL_FP16_WIRE)
    T, D = x.shape[1:]
    assert stats[0]["bytes_sent"] == T * D * 2 and stats[0]["num_messages"] == 2


def test_pipeline_chunks_overlap_stages():
    # with 3 chunks, stage 1 starts on chunk 0 while stage 0 still sends the others, so the pass
    # ends earlier than with the whole sequence in one message per hop
    model, x, _ = model_and_input("llama")
    slow = LinkConfig(bandwidth_mbps=1.0, latency_ms=50.0)
    T, D = x.shape[1:]
    one_hop_s = slow.transfer_time_s(T * D * 4)  # the whole sequence in one message

    def rank_fn(rank, world_size, comm, num_chunks):
        with torch.no_grad():
            return pp_rank_forward(rank, world_size, comm, share_weights_copy(model), x,
                                   num_chunks)

    _, clocks1, _ = run_lockstep(rank_fn, 3, slow, args=(1,))
    _, clocks3, _ = run_lockstep(rank_fn, 3, slow, args=(3,))
    assert clocks1[-1] >= 2 * one_hop_s
    assert clocks3[-1] < clocks1[-1]


def test_pipeline_errors():
    llama, x, _ = model_and_input("llama")
    vit, xv, _ = model_and_input("vit")
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 stages"):
        stage_ranges(3, 4)
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 stages"):
        pp_rank_forward(0, 4, None, llama, x)
    with pytest.raises(ValueError, match="num_chunks=3: ViT is a non-causal encoder"):
        pp_rank_forward(0, 2, None, vit, xv, num_chunks=3)
    with pytest.raises(ValueError, match="cannot split 19 tokens into 20 chunks"):
        pp_rank_forward(0, 2, None, llama, x, num_chunks=20)
    with pytest.raises(ValueError, match="hidden states are sent as one of"):
        pp_rank_forward(0, 2, None, llama, x, dtype=torch.int8)
    assert stage_ranges(5, 3) == [(0, 2), (2, 4), (4, 5)]


# ---- block parallelism (latency only) --------------------------------------------------------


@pytest.mark.parametrize(("name", "world_size", "num_syncs"),
                         [("vit", 2, 1), ("vit", 4, 3), ("llama", 2, 2)])
def test_block_parallel_sends_num_syncs_all_gathers(name, world_size, num_syncs):
    model, x, ref = model_and_input(name)
    outs, stats, _ = _lockstep(bp_rank_forward, model, world_size, x, num_syncs)
    T, D = x.shape[1:]
    for out, st in zip(outs, stats, strict=True):
        assert out.latency_only and out.num_syncs == num_syncs
        assert out.hidden.shape == (1, T, D)
        torch.testing.assert_close(out.hidden, outs[0].hidden, rtol=0, atol=0)
        # each sync: this rank's (T, D/N) fp32 slice to each of the N-1 peers
        assert st["num_messages"] == num_syncs
        assert st["bytes_sent"] == num_syncs * (world_size - 1) * T * (D // world_size) * 4
    # a different model: it is not (and must never be reported as) the model's output
    assert (model.head(outs[0].hidden) - ref).abs().max() > 1e-3


def test_block_parallel_sync_points_and_errors():
    assert sync_points(12, 1) == [11]
    assert sync_points(12, 4) == [2, 5, 8, 11]
    model, x, _ = model_and_input("vit")
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 syncs"):
        bp_rank_forward(0, 2, None, model, x, num_syncs=4)
    with pytest.raises(ValueError, match="valid device counts"):
        bp_rank_forward(0, 5, None, model, x)
