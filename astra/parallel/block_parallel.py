"""DeTransformer-style block parallelism (the paper's BP baseline, §7): LATENCY ONLY.

DeTransformer (Du et al., DATE'24 / TPDS) re-architects each layer into decoupled sub-blocks
that devices run independently, synchronising only Nb times over the whole model. That is a
different model: it needs re-pretraining, and no checkpoint of it exists for the models we run.
So this module reproduces its compute and communication, not its outputs:

- compute: every rank computes its 1/N slice of every block on the full sequence, exactly like
  tensor parallelism (its heads and MLP columns; norms and residuals on the full width), but the
  row-parallel outputs are NOT all-reduced: each rank adds its own partial to its own residual;
- communication: after each of `num_syncs` contiguous groups of blocks, the ranks all-gather the
  residual stream, each sending its own D/N channels (a (T, D/N) slice; channel ownership split
  as evenly as possible). That is one all-gather of (N-1)/N * T * D values per rank per sync,
  the "BP+AllGather" variant, against TP's two ring all-reduces of 2(N-1)/N * T * D per block.

The hidden states it returns are NOT the model's outputs (`BlockParallelOutput.latency_only` is
always True). Never report accuracy for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from astra.parallel.pipeline import split_ranges
from astra.parallel.tensor_parallel import (
    check_block,
    even_sizes,
    full_sequence_mask,
    shard_block_,
)


@dataclass
class BlockParallelOutput:
    """What bp_rank_forward returns: timing-faithful hidden states, not the model's."""

    hidden: Tensor  # (1, T, D), identical on every rank after the last sync; NOT model output
    num_syncs: int  # Nb: all-gathers over the whole model
    latency_only: bool = True  # always True: outputs would need a re-pretrained model


def sync_points(num_layers: int, num_syncs: int) -> list[int]:
    """Indices of the blocks after which the ranks synchronise (the last block is always one)."""
    return [stop - 1 for _, stop in split_ranges(num_layers, num_syncs, "syncs", "layers")]


def apply_block_parallel_(model: nn.Module, rank: int, world_size: int, comm) -> nn.Module:
    """Shard every block like TP, but with no all-reduce after the row-parallel layers."""
    for block in model.blocks:
        check_block(block, world_size)  # fail before touching any block
    for block in model.blocks:
        shard_block_(block, rank, world_size, comm, reduce=None)
    return model


def bp_rank_forward(
    rank: int, world_size: int, comm, model: nn.Module, x_full: Tensor, num_syncs: int = 1
) -> BlockParallelOutput:
    """This rank's part of one block-parallel pass over the embedded sequence x_full (1, T, D).

    Shards `model` in place (pass each rank its own copy). See the module docstring: only the
    compute and the bytes are faithful; the returned hidden states are not the model's output.
    """
    sync_points(len(model.blocks), num_syncs)  # validate before touching the model
    apply_block_parallel_(model, rank, world_size, comm)
    return bp_forward(rank, world_size, comm, model, x_full, num_syncs)


def bp_forward(
    rank: int, world_size: int, comm, model: nn.Module, x_full: Tensor, num_syncs: int = 1
) -> BlockParallelOutput:
    """One pass of an already sharded model (apply_block_parallel_); see bp_rank_forward."""
    syncs = set(sync_points(len(model.blocks), num_syncs))
    positions, mask = full_sequence_mask(model, x_full.shape[1])
    D = x_full.shape[-1]
    sizes = even_sizes(D, world_size)
    d0 = sum(sizes[:rank])
    x = x_full
    for i, block in enumerate(model.blocks):
        x = block(x, positions, mask)
        if i in syncs:
            with comm.stats.phase("bp.sync"):
                parts = comm.all_gather_tensor(x[..., d0 : d0 + sizes[rank]], dim=-1)
            x = torch.cat(parts, dim=-1)  # (1, T, D): each rank's own channels
    return BlockParallelOutput(hidden=x, num_syncs=num_syncs)
