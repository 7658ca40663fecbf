"""Pieces of one device's pass that every driver shares: `astra run` and `astra bench`
(astra.runner.rank_main) and the persistent group's workers (astra.group.worker).

Inputs in, the model's precision, where the time went, and the encoder's pooled output.
"""

from __future__ import annotations

import torch

from astra.group.config import DTYPES, SEARCHES


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def search_dtype(search: str) -> torch.dtype | None:
    """The codec's search dtype for a SEARCHES name (None: follow the compute dtype)."""
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not one of {SEARCHES}")
    return None if search == "auto" else DTYPES[search]


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


def decode_cache_bytes(model) -> dict:
    """The decode device's KV cache after decoding, summed over blocks (DecodeAttention)."""
    cache = {"local_exact_bytes": 0, "remote_code_bytes": 0, "remote_rebuilt_bytes": 0}
    for block in model.blocks:
        for key, value in block.attn.cache_bytes().items():
            cache[key] += value
    return cache
