"""One device of a persistent group: load the model once, then run requests until told to stop.

Every rank runs `serve_rank` in its own process (astra.net.launch.start_ranks). The parent
(astra.group.Group) sends each rank the same `WorkItem`; the ranks run it together over their
Communicator, the decode device streams tokens back as it draws them, and every rank ends the
item with its statistics. Nothing here knows about HTTP or the CLI.

Messages to the parent (one queue, shared by all ranks), each a tuple:
  ("ready", rank, info)          the model is loaded and every method warmed up
  ("token", rank, request, id)   the decode device drew a token
  ("done", rank, request, stats) this rank finished the request (stats None: it sat this one out)
  ("error", rank, request, text) this rank failed; the parent re-forms the group
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from astra.models import KVCache, load_model
from astra.net.comm import Communicator
from astra.net.link import LinkConfig
from astra.net.packets import PacketChannel, request_seed
from astra.parallel.engine import (
    build_rank_layout,
    build_sequence_layout,
    expand_class_tokens,
    install_rank_attention,
    make_codecs,
    sequence_parallel_forward,
)
from astra.parallel.passes import (
    decode_cache_bytes,
    decode_step,
    embed_inputs,
    encoder_output,
    pool_output,
    prepare_weights_,
    search_kind,
    stage_breakdown,
)
from astra.parallel.placement import PlacementConfig
from astra.parallel.runtime import (
    DecodeAttention,
    distinct_code_share,
    restore_attention_,
    use_causal_kernel_,
)
from astra.parallel.simulate import effective_class_tokens
from astra.sampling import Sampler, Sampling

if TYPE_CHECKING:
    from astra.net.protocol import Comm

HEARTBEAT_S = 0.25  # how often each worker stamps its slot in the shared heartbeat array


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank loads once, at start."""

    model_dir: str
    artefact: str | None  # ASTRA codebooks (None when no request may use "astra")
    methods: tuple[str, ...]  # methods to prepare (codecs) and warm up
    placement: str
    class_tokens: str  # "distributed" / "single" / "none", from the artefact or the task
    exchange: str
    remote_cache: str
    overlap: bool
    use_tables: bool
    dtype: str
    weights: str  # how the blocks' weights are stored (astra.models.quantize.WEIGHTS)
    search: str
    peer_timeout_s: float
    warmup_inputs: dict  # a short input of the model's kind, for the untimed warm-up passes
    owner_pid: int  # the process that owns the group: the workers end when it does


@dataclass(frozen=True)
class WorkItem:
    """One request, as every rank sees it."""

    request_id: int
    method: str
    inputs: dict  # {"input_ids": (1, T) int64} or {"pixels": (1, 3, S, S)}
    link: LinkConfig = LinkConfig()
    max_new_tokens: int = 0  # decoders: tokens to draw after the prefill (0: prefill only)
    sampling: Sampling = Sampling()
    stop_ids: tuple[int, ...] = ()  # end-of-sequence tokens: drawing one ends the request
    score: bool = False  # decoders: each device returns the NLL of its tokens' next tokens


class RankState:
    """One rank's loaded model, its codebooks and the codecs of every prepared method."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        model = load_model(spec.model_dir)
        self.base = model  # single / SP methods run the checkpoint's own weights
        self.quantizers = model.blocks  # only their count matters for full-precision codecs
        self.astra_model = model
        if spec.artefact is not None:
            from astra.parallel.artefact import load_astra

            if "astra" in spec.methods:
                astra = load_astra(spec.artefact, model, spec.model_dir)
                self.astra_model, self.quantizers = astra.model, astra.quantizers
                if astra.fine_tuned:  # its weights went into `model`: the others need the
                    self.base = load_model(spec.model_dir)  # checkpoint's own
        for m in {id(self.base): self.base, id(self.astra_model): self.astra_model}.values():
            prepare_weights_(m, spec.dtype, spec.weights)
        search = search_kind(spec.search)
        self.codecs = {
            method: make_codecs(method, self.quantizers, spec.use_tables, search)
            for method in spec.methods
            if method != "single"
        }
        self.causal = bool(getattr(model, "causal", False))
        self.class_tokens = effective_class_tokens(model, spec.class_tokens)
        self.placement: PlacementConfig | None = None  # per world size, set by the warm-up

    def model_for(self, method: str) -> nn.Module:
        return self.astra_model if method == "astra" else self.base


def serve_rank(
    rank: int,
    world_size: int,
    group,
    spec: WorkerSpec,
    inboxes: list,
    outbox: Any,
    cancel: Any,
    beats: Any,
) -> None:
    """A worker's whole life: load, warm up, report ready, run items until None arrives."""
    _start_heartbeat(beats, rank, spec.owner_pid)
    inbox = inboxes[rank]
    try:
        state = RankState(spec)
        comm = Communicator(group, LinkConfig(), timeout_s=spec.peer_timeout_s)
        info = _warm_up(rank, world_size, comm, state)
    except Exception as exc:  # reported by the parent as one line naming this device
        outbox.put(("error", rank, -1, f"{type(exc).__name__}: {exc}"))
        return
    outbox.put(("ready", rank, info))
    while True:
        item = inbox.get()
        if item is None:
            return
        emit = lambda token, rid=item.request_id: outbox.put(("token", rank, rid, token))  # noqa: E731
        cancelled = lambda rid=item.request_id: cancel.value == rid  # noqa: E731
        try:
            stats = run_item(rank, world_size, comm, state, item, emit, cancelled)
        except Exception as exc:  # a peer failed or the input was wrong: the parent decides
            outbox.put(("error", rank, item.request_id, f"{type(exc).__name__}: {exc}"))
            return  # this process group may be broken (a peer mid-collective): leave it
        outbox.put(("done", rank, item.request_id, stats))


def _start_heartbeat(beats: Any, rank: int, owner_pid: int) -> None:
    """Stamp time.time() into beats[rank] from a daemon thread: a process the OS stopped
    (SIGSTOP) or that hangs outside Python's reach stops stamping, which the parent notices.
    The same thread ends this process when the group's owner is gone (killed with SIGKILL or
    SIGTERM, it could not stop its workers): no device outlives its server."""

    def beat() -> None:
        while True:
            beats[rank] = time.time()
            try:
                os.kill(owner_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="astra-heartbeat", daemon=True).start()


def _warm_up(rank: int, world_size: int, comm, state: RankState) -> dict:
    """One untimed pass per method on an ideal link (allocators, kernels, tables); with
    balanced placement, the per-token costs are fitted here once. Returns each method's time
    for the warm-up input, which the parent's fallback estimate scales."""
    from astra.runner import fit_balanced_placement

    spec = state.spec
    placement = PlacementConfig(world_size, kind=spec.placement)
    if state.codecs:  # balanced placement: fit the per-token costs once, on a real pass
        method = "astra" if "astra" in state.codecs else next(iter(state.codecs))
        model = state.model_for(method)
        x_full = embed_inputs(model, spec.warmup_inputs)
        placement = fit_balanced_placement(
            placement, model, x_full, state.codecs[method], rank, comm, spec.exchange, spec.overlap
        )
    state.placement = placement
    times: dict[str, float] = {}
    bytes_per_token: dict[str, float] = {}
    for method in spec.methods:
        item = WorkItem(request_id=-1, method=method, inputs=spec.warmup_inputs)
        for _ in range(2):  # the second pass is the warm one
            stats = run_item(rank, world_size, comm, state, item, lambda t: None, lambda: False)
        if stats is not None:
            times[method] = stats["prefill_ms"]
            bytes_per_token[method] = stats["comm"]["bytes_sent"] / max(stats["tokens"], 1)
    return {
        "pid": os.getpid(),
        "warmup_prefill_ms": times,
        "warmup_bytes_per_token": bytes_per_token,  # of this device's own tokens
        "num_blocks": len(state.base.blocks),
    }


@torch.no_grad()
def run_item(
    rank: int, world_size: int, comm: Comm, state: RankState, item: WorkItem, emit, cancelled
):
    """This rank's part of one request; None when the method leaves this rank out."""
    if item.method == "single" or world_size == 1:
        if rank != 0:
            return None
        return _run_single(state, item, emit, cancelled, comm.now)
    comm.link = item.link
    try:
        return _run_sequence_parallel(rank, world_size, comm, state, item, emit, cancelled)
    finally:
        comm.link = LinkConfig()


def _run_single(state: RankState, item: WorkItem, emit, cancelled, now) -> dict:
    """The whole model on this device: exact causal kernel for the prefill, KV cache after."""
    model = state.model_for("single")
    for block in model.blocks:  # whatever the last request installed: back to the model's own
        block.attn = getattr(block.attn, "inner", block.attn)
    t0 = now()
    x = embed_inputs(model, item.inputs)
    positions = torch.arange(x.shape[1])
    out: dict = {"rank": 0, "tokens": int(x.shape[1])}
    if not state.causal:
        for block in model.blocks:
            x = block(x, positions, None)
        out["output"] = pool_output(model, model.head(x))
    else:
        use_causal_kernel_(model)
        caches = [KVCache() for _ in model.blocks]
        for block, cache in zip(model.blocks, caches):
            x = block(x, positions, None, cache=cache)
        restore_attention_(model)
        if item.score:
            out.update(_next_token_nll(model, x, positions, item.inputs["input_ids"]))

        def step(token: int, pos: int) -> torch.Tensor:
            return decode_step(model, token, pos, caches)

        out.update(_generate(model.head(x[:, -1:]), step, x.shape[1], item, emit, cancelled, now))
    first_at = out.pop("first_at", None) or now()  # the first token drawn, or the output
    out["ttft_ms"] = out["prefill_ms"] = (first_at - t0) * 1e3
    out["comm"] = {"bytes_sent": 0, "bytes_received": 0, "comm_ms": 0.0, "wait_ms": 0.0}
    return out


def _generate(logits, step, start: int, item: WorkItem, emit, cancelled, now) -> dict:
    """Draw the first token from the prefill's logits, then up to max_new_tokens - 1 more.

    step(token, position) -> logits runs one decoding step. "first_at" is the moment the first
    token was drawn (the end of the time to first token); the time per output token counts
    every step after it (as llama.cpp and vLLM report it)."""
    if item.max_new_tokens == 0:
        return {}
    sampler = Sampler(item.sampling)
    token = sampler(logits)
    first_at = now()
    emit(token)
    generated, finish = [token], "length"
    while True:
        if token in item.stop_ids:
            finish = "stop"
            break
        if cancelled():
            finish = "cancelled"
            break
        if len(generated) >= item.max_new_tokens:
            break
        token = sampler(step(token, start + len(generated) - 1))
        generated.append(token)
        emit(token)
    steps = len(generated) - 1
    tpot = (now() - first_at) * 1e3 / steps if steps else None
    return {"generated": generated, "tpot_ms": tpot, "finish_reason": finish, "first_at": first_at}


def _run_sequence_parallel(
    rank, world_size, comm, state: RankState, item: WorkItem, emit, cancelled
):
    """ASTRA or full-precision SP: this rank's tokens, remote ones through the method's codec;
    the device holding the last token then decodes on its own (paper §3.1 step 4)."""
    spec = state.spec
    model = state.model_for(item.method)
    x_full = embed_inputs(model, item.inputs)
    placement = state.placement or PlacementConfig(world_size, kind=spec.placement)
    seq = build_sequence_layout(x_full.shape[1], placement, state.class_tokens)
    x_full = expand_class_tokens(x_full, seq.num_replicas)
    layout = build_rank_layout(seq, rank, world_size, state.causal)
    decode_rank = int(seq.device_of_token[-1])
    # lost codes (--loss): the same tokens dropped as in the single-process simulation
    loss = PacketChannel.for_link(item.link, request_seed(item.inputs))
    install_rank_attention(
        model,
        state.codecs[item.method],
        layout,
        comm,
        spec.overlap,
        loss=loss,
        exchange=spec.exchange,
    )
    decodes = state.causal and item.max_new_tokens > 0 and rank == decode_rank
    for block in model.blocks:
        block.attn.timings = {}
        if decodes:
            block.attn.capture = {}
    comm.stats.reset()
    comm.barrier()
    t0 = comm.now()
    with comm.stats.phase("prefill"):
        hidden = sequence_parallel_forward(model, x_full, layout)
    out: dict = {"rank": rank, "tokens": int(layout.local_index.numel())}
    out["lost_remote_tokens"] = sum(block.attn.lost_tokens for block in model.blocks)
    if not state.causal:
        with comm.stats.phase("output"):
            out["output"] = encoder_output(model, hidden, layout, seq, comm)
    out["prefill_ms"] = (comm.now() - t0) * 1e3
    out["distinct_code_share"] = distinct_code_share(model)  # after the clock: bookkeeping
    if item.score and state.causal:  # this device's tokens predict their successors
        ids = item.inputs["input_ids"]
        out.update(_next_token_nll(model, hidden, layout.local_positions, ids))
    out["breakdown_ms"] = stage_breakdown(model, out["prefill_ms"])
    if placement.cost is not None:  # balanced: the fitted costs that sized the chunks
        out["placement_cost"] = asdict(placement.cost)
    if decodes:
        for block in model.blocks:
            block.attn = DecodeAttention(block.attn, block.attn.capture, spec.remote_cache)

        def step(token: int, pos: int) -> torch.Tensor:
            return decode_step(model, token, pos)

        logits = model.head(hidden[:, -1:])
        out.update(_generate(logits, step, x_full.shape[1], item, emit, cancelled, comm.now))
        out["ttft_ms"] = out["prefill_ms"] = (out.pop("first_at") - t0) * 1e3
        out["kv_cache"] = decode_cache_bytes(model)
    comm.wait_sends()  # streamed codes delivered before this rank's numbers are final
    out["comm"] = comm.stats.to_dict()
    return out


def _next_token_nll(model: nn.Module, hidden, positions, ids) -> dict:
    """Summed negative log-likelihood of the token after each held position (the sequence's
    last position predicts nothing): with every device's sums added, the perplexity of the
    whole sequence, exactly as astra.tasks.LanguageModeling scores it on one device."""
    keep = positions < ids.shape[1] - 1
    logits = model.head(hidden[:, keep]).float()  # (1, T_kept, V)
    targets = ids[0, positions[keep] + 1]  # (T_kept,)
    nll = torch.nn.functional.cross_entropy(logits[0], targets, reduction="sum")
    return {"nll_sum": float(nll), "nll_count": int(targets.numel())}
