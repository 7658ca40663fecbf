"""Weight-only quantization (astra.models.quantize): the kernels compute what the stored
weights say, both row paths agree, and ASTRA runs on a quantized model.

Tolerances: bf16 activations, so kernel against a bf16 reference matmul of the dequantized
weight within 2e-2 relative to the output's scale; 8-bit weights within 1 % of the float
weights' output, 4-bit (16 levels per group) within 15 %; the runtime against the simulation
atol 1e-3 (bf16 activations round differently on different shapes).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from astra.models.quantize import (
    DENSE_ROWS,
    QuantizedLinear,
    quantize_weights_,
    unpack_int4,
    weight_bytes,
)
from astra.sampling import Sampling


@pytest.mark.parametrize("bits,max_rel", [(8, 0.01), (4, 0.15)])
@pytest.mark.parametrize("rows", [1, DENSE_ROWS, DENSE_ROWS + 7])
@torch.no_grad()
def test_quantized_linear_matches_its_weights(bits, max_rel, rows):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = QuantizedLinear(linear, bits)
    x = torch.randn(2, rows, 128)
    y = q(x)
    assert y.shape == (2, rows, 96) and y.dtype == x.dtype
    scale = linear(x).abs().max()
    reference = (x.bfloat16() @ q.weight.t()).float() + linear.bias  # what is stored, applied
    assert (y - reference).abs().max() / scale < 2e-2
    assert (y - linear(x)).abs().max() / scale < max_rel  # how close storage is to the floats


def test_int4_unpacks_the_kernels_own_layout():
    q = torch.randint(0, 16, (96, 128), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_int4(packed, 96, 128), q.long())


def test_bad_bits_and_groups_are_named():
    with pytest.raises(ValueError, match="one of \\(8, 4\\), got 3"):
        QuantizedLinear(nn.Linear(64, 8), 3)
    with pytest.raises(ValueError, match="in_features \\(40\\) divisible by the group size 64"):
        QuantizedLinear(nn.Linear(40, 8), 4)


@torch.no_grad()
def test_astra_on_a_quantized_model_matches_its_simulation():
    """The runtime on a 4-bit model equals the simulation of the same model (the codebooks
    do not care how the weights are stored)."""
    from astra.models.decoder import Decoder, DecoderConfig
    from astra.net.link import LinkConfig
    from astra.net.lockstep import run_lockstep, share_weights_copy
    from astra.parallel.config import AstraConfig
    from astra.parallel.engine import build_sequence_layout, rank_forward
    from astra.parallel.placement import PlacementConfig
    from astra.parallel.simulate import apply_astra

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=97, dim=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=16, mlp_dim=128)).eval()
    full = weight_bytes(model)
    quantize_weights_(model, 4)
    assert weight_bytes(model) < full
    x = model.embed(torch.randint(0, 97, (1, 18)))
    astra = apply_astra(copy.deepcopy(model), AstraConfig(quant_point="kv", num_groups=2,
                                                          codebook_size=16))
    for quantizer, parts in zip(
        astra.quantizers, astra.record_quant_inputs(lambda: astra.forward_hidden(x, None))
    ):
        for codebook, samples in zip(quantizer.codebooks, parts):
            codebook.kmeans_init_(samples, num_iters=3, seed=0)
    simulated = astra.forward_hidden(x, PlacementConfig(2))
    seq = build_sequence_layout(18, PlacementConfig(2), "none")

    def fn(rank, world_size, comm):
        return rank_forward(rank, world_size, comm, share_weights_copy(astra.model),
                            astra.quantizers, x, seq)

    outs, _, _ = run_lockstep(fn, 2, LinkConfig(bandwidth_mbps=10.0, latency_ms=0.0))
    for rank, out in enumerate(outs):
        idx = torch.nonzero(seq.device_of_token == rank).flatten()
        torch.testing.assert_close(out, simulated[:, idx], rtol=0, atol=1e-3)


def test_store_weights_names_the_choices():
    from astra.models.quantize import store_weights_
    from astra.runner import RunConfig

    with pytest.raises(ValueError, match=r"'int2' is not one of \('full', 'int8', 'int4'\)"):
        store_weights_(nn.Sequential(), "int2")
    with pytest.raises(ValueError, match="weights 'int3' is not one of"):
        RunConfig(weights="int3")


def test_a_group_stores_the_weights_it_is_asked_for(tiny_llama_dir):
    """GroupConfig.weights: the workers' one-device scores are an in-process model's quantized
    the same way, not full precision's; ASTRA runs on the 4-bit model and reports it."""
    from astra.group import Group, GroupConfig, LinkConfig
    from astra.models import load_model
    from astra.tasks import TaskConfig, make_task

    def nll(model, ids) -> float:
        task = make_task(model, tiny_llama_dir, TaskConfig(seq_len=48))
        with torch.no_grad():
            return task.score(model(ids), None, {"input_ids": ids})[0]

    full = load_model(tiny_llama_dir)
    ids = make_task(full, tiny_llama_dir, TaskConfig(seq_len=48)).token_blocks("test", 1)
    quantized = quantize_weights_(load_model(tiny_llama_dir), 4)
    config = GroupConfig(model=str(tiny_llama_dir), devices=2, methods=("single", "astra"),
                         link=LinkConfig(), weights="int4", warmup_tokens=16, peer_timeout_s=20)
    with Group(config) as group:
        single = group.score(ids[0].tolist(), method="single")
        astra = group.score(ids[0].tolist(), method="astra")
        out = group.generate(ids[0, :20].tolist(), Sampling(max_tokens=3, temperature=0.0),
                             method="astra")
    # the workers' NLL is the 4-bit model's, ten times closer to it than to full precision's
    # (near-uniform logits of a random model: 4 bits move the NLL sum by about 3e-4 relative)
    moved = abs(nll(full, ids) - nll(quantized, ids))
    assert moved > 0 and abs(single.nll_sum - nll(quantized, ids)) < 0.1 * moved
    assert astra.num_predicted == 47 and math.isfinite(astra.perplexity)
    assert out.record.weights == "int4" and len(out.token_ids) == 3


def test_run_with_8_bit_weights_reports_them(tiny_llama_dir, tmp_path, monkeypatch):
    from astra import runner
    from astra.runner import RunConfig, run_inference

    monkeypatch.setattr(runner, "default_artefact", lambda model_dir, cfg: tmp_path / "cb")
    config = RunConfig(model=str(tiny_llama_dir), devices=2, tokens=64, new_tokens=3,
                       methods=("single", "astra"), mode="composed", weights="int8")
    summary = run_inference(config, progress=False, log=lambda m: None)
    assert {r["weights"] for r in summary["records"]} == {"int8"}
    assert all(len(r["generated_ids"]) == 3 for r in summary["records"])
