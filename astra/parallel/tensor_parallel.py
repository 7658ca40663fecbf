"""Megatron-style tensor parallelism (the paper's TP baseline, §7), applied from the outside.

`apply_tensor_parallel_` shards every block of a loaded single-device model in place, the way
gpt-fast's tp.py does: q/k/v are column-parallel by heads (GQA: the kv heads are split too, so
each rank keeps whole kv groups), o_proj is row-parallel and followed by an all-reduce; the MLP's
first linear(s) are column-parallel and its last row-parallel, followed by an all-reduce. Biases
of row-parallel layers are added once, after the reduce. Norms, residuals and layer scale stay
replicated. Every rank runs the full sequence, so each block costs two all-reduces of the
(T, D) hidden state (Megatron-LM, Shoeybi et al. 2019, §3) - what the paper charges TP with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra.models.attention import Attention, causal_mask

# MLP layout per model family: (where, first linears (column-parallel), last linear (row)).
# "mlp" = block.mlp holds them (Llama, ViT/DINOv2); "" = the block itself (GPT-2, BERT).
MLP_LAYOUTS = (
    ("mlp", ("gate_proj", "up_proj"), "down_proj"),  # Llama SwiGLU
    ("mlp", ("fc1",), "fc2"),  # ViT / DINOv2
    ("", ("fc",), "proj"),  # GPT-2
    ("", ("fc1",), "fc2"),  # BERT
)


def even_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` contiguous sizes differing by at most one (larger ones first)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _offset(sizes: list[int], index: int) -> tuple[int, int]:
    start = sum(sizes[:index])
    return start, start + sizes[index]


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    """Device counts that split both the query heads and the kv heads evenly."""
    return [n for n in range(1, num_kv_heads + 1) if num_heads % n == 0 and num_kv_heads % n == 0]


def check_tp_size(attn: Attention, world_size: int) -> None:
    """Any N up to the number of query heads works: when N does not divide both head counts,
    heads are split as evenly as possible and each rank projects the kv heads its query heads
    use (kv heads are replicated where the split cuts a GQA group, as Megatron replicates kv
    heads when the TP size exceeds num_kv_heads). The even split is the fast path."""
    H = attn.num_heads
    if world_size < 1 or world_size > H:
        raise ValueError(
            f"tensor parallelism over {world_size} devices needs at least one query head per "
            f"device: num_heads={H}; valid device counts: 1..{H} (evenly split: "
            f"{valid_tp_sizes(H, attn.num_kv_heads)})"
        )


class RowParallelLinear(nn.Module):
    """This rank's input-column slice of a Linear: y = reduce(x_slice @ W_slice^T) + b.

    `reduce` is the all-reduce (TP) or None (block parallelism's unsynchronised partials); the
    bias is added once, after the reduce, so the sum over ranks counts it once.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, reduce, phase: str, comm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (D_out, D_in / N)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.reduce, self.phase, self.comm = reduce, phase, comm

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)  # (B, T, D_out) partial sum
        if self.reduce is not None:
            with self.comm.stats.phase(self.phase):
                y = self.reduce(y)
        return y if self.bias is None else y + self.bias


def _column_slice(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """Output rows [start, stop) of `linear` as a new Linear, in new tensors (weights may be
    shared with other ranks)."""
    out = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype).requires_grad_(False)
    with torch.no_grad():
        out.weight.copy_(linear.weight[start:stop])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[start:stop])
    return out


def _row_gather(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new Linear with the given output rows of `linear` (rows may repeat)."""
    out = nn.Linear(linear.in_features, rows.numel(), bias=linear.bias is not None)
    out = out.to(device=linear.weight.device, dtype=linear.weight.dtype).requires_grad_(False)
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out


def _row_slice(linear: nn.Linear, start: int, stop: int, reduce, phase: str, comm):
    weight = linear.weight[:, start:stop].detach().clone()
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return RowParallelLinear(weight, bias, reduce, phase, comm)


def find_mlp(block: nn.Module) -> tuple[nn.Module, tuple[str, ...], str]:
    """(module holding the MLP linears, first linear names, last linear name) of a block."""
    for where, firsts, last in MLP_LAYOUTS:
        owner = getattr(block, where, None) if where else block
        if owner is not None and all(
            isinstance(getattr(owner, n, None), nn.Linear) for n in (*firsts, last)
        ):
            return owner, firsts, last
    raise TypeError(
        f"{type(block).__name__}: no known MLP layout; expected one of "
        f"{[(w or 'block', f, last) for w, f, last in MLP_LAYOUTS]}"
    )


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")


def check_block(block: nn.Module, world_size: int) -> None:
    """Raise unless `block` is an unsharded block whose heads split over world_size devices."""
    attn = block.attn
    if not isinstance(attn, Attention):
        raise TypeError(f"block.attn is {type(attn).__name__}, expected a plain Attention")
    if isinstance(attn.o_proj, RowParallelLinear):
        raise ValueError("block is already sharded (apply tensor/block parallelism only once)")
    check_tp_size(attn, world_size)
    find_mlp(block)


def shard_block_(block: nn.Module, rank: int, world_size: int, comm, reduce) -> None:
    """Keep this rank's heads and MLP columns of `block` (in place); `reduce` as RowParallelLinear.

    New parameter tensors are made, never slices written into the old ones, so a model whose
    weights are shared between lockstep ranks (share_weights_copy) stays intact.
    """
    check_rank(rank, world_size)
    check_block(block, world_size)
    attn = block.attn
    hd = attn.head_dim
    H_all, Hkv_all = attn.num_heads, attn.num_kv_heads
    if H_all % world_size == 0 and Hkv_all % world_size == 0:
        H, Hkv = H_all // world_size, Hkv_all // world_size
        q0, kv0 = rank * H * hd, rank * Hkv * hd
        # contiguous head ranges keep GQA groups whole: q head h uses kv head h // (H/Hkv)
        attn.k_proj = _column_slice(attn.k_proj, kv0, kv0 + Hkv * hd)
        attn.v_proj = _column_slice(attn.v_proj, kv0, kv0 + Hkv * hd)
    else:  # uneven: this rank's q heads, each with its own copy of the kv head it uses
        h0, h1 = _offset(even_sizes(H_all, world_size), rank)
        H, Hkv, q0 = h1 - h0, h1 - h0, h0 * hd
        group = H_all // Hkv_all
        rows = torch.cat(
            [torch.arange(h // group * hd, (h // group + 1) * hd) for h in range(h0, h1)]
        )
        attn.k_proj = _row_gather(attn.k_proj, rows)
        attn.v_proj = _row_gather(attn.v_proj, rows)
    attn.q_proj = _column_slice(attn.q_proj, q0, q0 + H * hd)
    attn.o_proj = _row_slice(attn.o_proj, q0, q0 + H * hd, reduce, "tp.attn", comm)
    attn.num_heads, attn.num_kv_heads = H, Hkv

    owner, firsts, last = find_mlp(block)
    hidden = getattr(owner, firsts[0]).out_features
    # the MLP width need not divide: uneven slices still sum to the full product
    m0, m1 = _offset(even_sizes(hidden, world_size), rank)
    for name in firsts:
        setattr(owner, name, _column_slice(getattr(owner, name), m0, m1))
    setattr(owner, last, _row_slice(getattr(owner, last), m0, m1, reduce, "tp.mlp", comm))


def apply_tensor_parallel_(model: nn.Module, rank: int, world_size: int, comm) -> nn.Module:
    """Shard every block of `model` for `rank` of `world_size` (in place); returns the model.

    Raises ValueError (naming the valid device counts) if the heads do not divide.
    """
    for block in model.blocks:
        check_block(block, world_size)  # fail before touching any block
    for block in model.blocks:
        shard_block_(block, rank, world_size, comm, comm.all_reduce_tensor)
    return model


def full_sequence_mask(model: nn.Module, num_tokens: int) -> tuple[Tensor, Tensor | None]:
    """(positions (T,), mask) of a whole sequence: causal for decoders, None for encoders."""
    positions = torch.arange(num_tokens)
    mask = causal_mask(positions, positions) if getattr(model, "causal", False) else None
    return positions, mask


def tp_rank_forward(rank: int, world_size: int, comm, model: nn.Module, x_full: Tensor) -> Tensor:
    """This rank's part of one TP pass over the embedded sequence x_full (1, T, D).

    Shards `model` in place (pass each rank its own copy) and returns the last hidden states
    (1, T, D), identical on every rank and equal to the single-device blocks' output.
    """
    apply_tensor_parallel_(model, rank, world_size, comm)
    return tp_forward(model, x_full)


def tp_forward(model: nn.Module, x_full: Tensor) -> Tensor:
    """One pass of an already sharded model (apply_tensor_parallel_) over x_full (1, T, D)."""
    positions, mask = full_sequence_mask(model, x_full.shape[1])
    x = x_full
    for block in model.blocks:
        x = block(x, positions, mask)
    return x
