"""Weight-only quantization (astra.models.quantize): the kernels compute what the stored
weights say, both row paths agree, and ASTRA runs on a quantized model.

Tolerances: bf16 activations, so kernel against a bf16 reference matmul of the dequantized
weight within 2e-2 relative to the output's scale; 8-bit weights within 1 % of the float
weights' output, 4-bit (16 levels per group) within 15 %; the runtime against the simulation
atol 1e-3 (bf16 activations round differently on different shapes).
"""

from __future__ import annotations

import copy

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
