"""Pieces of one device's pass that every driver shares: `astra run` and `astra bench`
(astra.runner.rank_main) and the persistent group's workers (astra.group.worker).

Inputs in, the model's precision, where the time went, and the encoder's pooled output.
"""

from __future__ import annotations

import torch

from astra.models.quantize import store_weights_
from astra.precision import DTYPES, SEARCHES


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX): there a bf16 matmul runs
    2-5x faster than fp32, so the senders' code search can afford its bf16 first pass."""
    flags = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, flag, lambda: False)() for flag in flags)


def search_kind(search: str) -> str:
    """The codecs' search (astra.vq.codebook.SEARCH_KINDS) for a SEARCHES name. "auto": bf16
    dot products where the CPU has them natively, else the "pca" first pass.

    Why a cheaper first pass by default, even for an fp32 model: the search is ASTRA's largest
    extra work (a sender's (T/N x D) x (D x K) product per codebook per block). With native
    bf16 the bf16 pass with an exact re-rank of the two best candidates costs much less, within
    0.05 % perplexity of the exact search (benchmarks/latency.md, "the cheaper first pass");
    without it, a pass in a third of the dimensions with four candidates re-ranked is 1.3-1.5x
    faster than the exact search at 99.4-99.5 % of rows exact (search_alternatives.py).
    What it returns is what the senders run, whatever the compute dtype: the records' name."""
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not one of {SEARCHES}")
    if search == "auto":
        return "bfloat16" if native_bf16() else "pca"
    return search


def embed_inputs(model, inputs: dict) -> torch.Tensor:
    """The built-in inputs ({'pixels'} or {'input_ids'}) embedded by the model: (1, T, D)."""
    if "pixels" in inputs:  # pixels in the model's precision (the patch convolution's)
        return model.embed(inputs["pixels"].to(next(model.parameters()).dtype))
    ids = inputs["input_ids"]
    return model.embed(ids, positions=torch.arange(ids.shape[1]))


def to_compute_dtype_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The model's parameters in `dtype`, in place: composed-mode ranks share one set, which is
    converted once. Buffers stay as built: RoPE's inv_freq is float32, as HF keeps it (rounded
    to bf16 it turns position 2048 by up to 2.8 rad too far). Codebooks are not parameters of
    the model and stay float32."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def prepare_weights_(model: torch.nn.Module, dtype: str, weights: str) -> None:
    """A loaded model made ready to run, in place, once any fine-tuned weights went in: its
    parameters in the compute `dtype`, its blocks stored as `weights` (full, int8, int4) and
    every remaining linear weight laid out for fast one-row products. The one preparation the
    workers (astra.group.worker) and `astra run` / `bench` ranks (astra.runner) share."""
    to_compute_dtype_(model, check_dtype(dtype))
    store_weights_(model, weights)
    matmul_layout_(model)


def matmul_layout_(model: torch.nn.Module) -> None:
    """Every linear weight stored in the order its dtype multiplies one row fastest, in place;
    the values do not change. Decoding is a chain of one-row products, and on one core an fp32
    (out, in) weight with out >= in multiplies a row 1.4-1.7x faster stored as (in, out) (x W^T
    then reads W^T's rows in order): SmolLM2's gate/up projections 200 -> 129 us, its
    49152-word head 7.2 -> 4.2 ms, while 1024-row prefills keep their speed (17.4 vs 17.2 ms).
    Narrower fp32 weights and every bf16 one are fastest as (out, in), PyTorch's own order
    (benchmarks/latency.md, "decoding"). A head tied to the embedding takes the embedding with
    it: looking up a prompt's rows then costs about 8 ms more per 1024 tokens."""
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        out_features, in_features = weight.shape
        if weight.dtype == torch.float32 and out_features >= in_features:
            if weight.stride() != (1, out_features):  # (in, out) storage, (out, in) view
                weight.data = weight.data.t().contiguous().t()
        elif not weight.is_contiguous():
            weight.data = weight.data.contiguous()


def stage_breakdown(model, total_ms: float) -> dict[str, float]:
    """Time per stage of the per-rank attention, summed over blocks; the rest is the MLPs,
    norms, residuals and the head."""
    stages: dict[str, float] = {}
    for block in model.blocks:
        for stage, ms in (getattr(block.attn, "timings", None) or {}).items():
            stages[stage] = stages.get(stage, 0.0) + ms
    if stages:
        stages["mlp_and_rest"] = total_ms - sum(stages.values())
    return stages


def pool_output(model, final: torch.Tensor) -> torch.Tensor:
    """Encoder output: the class token (ViT) or the mean of all tokens (BERT): the model's
    `pooling`."""
    if model.pooling == "mean":
        return final.mean(dim=1)[0]
    return final[0, 0]


def encoder_output(model, hidden, layout, seq, comm) -> torch.Tensor:
    """Gather the pieces of the output every device needs (a few floats per device)."""
    if model.pooling == "mean":  # the sum of local tokens and their count
        local = torch.cat([hidden[0].sum(0), torch.tensor([float(hidden.shape[1])])])
        parts = comm.all_gather_tensor(local[None])
        total = torch.cat(parts).sum(0)
        return total[:-1] / total[-1]
    if seq.num_replicas:  # distributed class tokens: mean of the replicas, then the head
        replicas = torch.cat(comm.all_gather_tensor(hidden[:, 0]))  # (N, D)
        return model.head(replicas.mean(0, keepdim=True)[None])[0, 0]
    # single class token on rank 0
    cls = hidden[:, 0] if layout.rank == 0 else hidden.new_zeros(1, hidden.shape[-1])
    return model.head(comm.all_gather_tensor(cls)[0][None])[0, 0]


def decode_step(model, token: int, position: int, caches=None) -> torch.Tensor:
    """One decoding step through every block: the logits (1, 1, V) after `token` at `position`.
    `caches`: one KVCache per block (the single device), or None where each block's attention
    keeps its own (DecodeAttention on the device that decodes after ASTRA's prefill)."""
    where = torch.tensor([position])  # one tensor for every block: RoPE's tables are reused
    h = model.embed(torch.tensor([[token]]), positions=where)  # (1, 1, D)
    for i, block in enumerate(model.blocks):
        h = block(h, where, None, cache=None if caches is None else caches[i])
    return model.head(h)


def decode_cache_bytes(model) -> dict:
    """The decode device's KV cache after decoding, summed over blocks (DecodeAttention)."""
    cache = {"local_exact_bytes": 0, "remote_code_bytes": 0, "remote_rebuilt_bytes": 0}
    for block in model.blocks:
        for key, value in block.attn.cache_bytes().items():
            cache[key] += value
    return cache
