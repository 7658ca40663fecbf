"""Pipeline parallelism with chunked prefill: the baseline Petals, exo and prima.cpp deploy.

Layers are split into contiguous stages, one per rank. The sequence is cut into `num_chunks`
chunks: stage s runs chunk c through its layers, sends the chunk's hidden states to stage s+1
and goes on with chunk c+1, so stages work on different chunks at once. In causal models each
stage keeps a KV cache per layer, so chunk c attends to chunks < c exactly as in one pass. An
encoder's token attends to every token, later chunks included, so it cannot be chunked
(num_chunks must be 1, and the stages then run one after another).

Traffic: each stage but the last sends T*D hidden values once (fp32, or fp16/bf16 to halve it),
in `num_chunks` messages; latency is paid per message and per hop.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astra.models.attention import KVCache, causal_mask
from astra.parallel.tensor_parallel import check_rank, even_sizes

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def split_ranges(total: int, parts: int, what: str, unit: str) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, as even as possible (earlier ones take the remainder)."""
    if parts < 1 or parts > total:
        raise ValueError(
            f"cannot split {total} {unit} into {parts} {what}: need 1 <= {what} <= {total}"
        )
    sizes, start, out = even_sizes(total, parts), 0, []
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def stage_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Blocks [start, stop) of each pipeline stage."""
    return split_ranges(num_layers, num_stages, "stages", "layers")


def check_pipeline(
    model: nn.Module, num_stages: int, num_tokens: int, num_chunks: int, dtype: torch.dtype
) -> None:
    stage_ranges(len(model.blocks), num_stages)
    if num_chunks != 1 and not getattr(model, "causal", False):
        raise ValueError(
            f"num_chunks={num_chunks}: {type(model).__name__} is a non-causal encoder (every "
            "token attends to every other), so its sequence cannot be chunked; use num_chunks=1"
        )
    split_ranges(num_tokens, num_chunks, "chunks", "tokens")
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"hidden states are sent as one of {WIRE_DTYPES}, got {dtype}")


def pp_rank_forward(
    rank: int,
    world_size: int,
    comm,
    model: nn.Module,
    x_full: Tensor,
    num_chunks: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Tensor | None:
    """Stage `rank` of a pipelined pass over the embedded sequence x_full (1, T, D).

    Only stage 0 reads x_full (it holds the embeddings). Returns the last hidden states
    (1, T, D) on the last rank, equal to the single-device blocks' output when dtype is fp32;
    None on the other ranks. `dtype` is the precision of the hidden states on the wire.
    """
    T = x_full.shape[1]
    check_rank(rank, world_size)
    check_pipeline(model, world_size, T, num_chunks, dtype)
    start, stop = stage_ranges(len(model.blocks), world_size)[rank]
    causal = getattr(model, "causal", False)
    caches = [KVCache() for _ in range(start, stop)] if causal else None
    outputs = []
    for c0, c1 in split_ranges(T, num_chunks, "chunks", "tokens"):
        if rank == 0:
            x = x_full[:, c0:c1]
        else:
            with comm.stats.phase("pp"):
                x = comm.recv_tensor(rank - 1).to(x_full.dtype)  # (1, T_chunk, D)
        positions = torch.arange(c0, c1)
        # a chunk sees itself causally and every earlier chunk through the cache
        mask = causal_mask(positions, torch.arange(c1)) if causal else None
        for i, block in enumerate(model.blocks[start:stop]):
            if caches is None:
                x = block(x, positions, mask)
            else:
                x = block(x, positions, mask, cache=caches[i])
        if rank < world_size - 1:
            with comm.stats.phase("pp"):
                comm.send_tensor(x.to(dtype).contiguous(), rank + 1)
        else:
            outputs.append(x)
    return torch.cat(outputs, dim=1) if rank == world_size - 1 else None
