"""The main job: one inference spread over N devices, measured against the alternatives.

`run_inference(RunConfig)` runs, in one go and on the same emulated link:
- `single`: the whole model on one device (one process, one thread per device),
- `astra`: ASTRA (codes on the wire, mixed-precision attention, distributed prefill),
- `sp-fp32` / `sp-fp16`: full-precision sequence parallelism (Voltage),
and returns one record per method with the output, time to first token (prefill), time per
output token (decoders), compute/communication/wait time and bytes per device.

Devices are real processes over torch.distributed (`mode="processes"`) when there are enough
cores, else the composed mode (astra.net.lockstep) that measures each device's compute for real,
one device at a time, and composes the critical path with the link model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from astra.group.config import GroupConfig, QuantConfig
from astra.group.records import record_from_ranks
from astra.hub import cache_dir, resolve_model
from astra.methods import GENERATING_METHODS, PREFILL_ONLY_METHODS, check_methods
from astra.models import (
    KVCache,
    context_length,
    load_model,
    load_tokenizer,
    model_kind,
    model_spec,
    num_input_tokens,
)
from astra.net.comm import Communicator, all_gather_json
from astra.net.launch import spawn
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.net.packets import PacketChannel, request_seed
from astra.parallel.artefact import codebook_summary, load_astra
from astra.parallel.config import AstraConfig
from astra.parallel.engine import (
    build_rank_layout,
    build_sequence_layout,
    expand_class_tokens,
    install_rank_attention,
    make_codecs,
    sequence_parallel_forward,
)
from astra.parallel.passes import (
    check_dtype,
    decode_cache_bytes,
    decode_step,
    embed_inputs,
    encoder_output,
    pool_output,
    prepare_weights_,
    search_kind,
    stage_breakdown,
)
from astra.parallel.placement import (
    COST_FIELDS,
    CausalCost,
    PlacementConfig,
    check_device_speeds,
    fit_causal_cost,
)
from astra.parallel.runtime import (
    DecodeAttention,
    distinct_code_share,
    resolve_exchange,
    restore_attention_,
    use_causal_kernel_,
)
from astra.parallel.simulate import effective_class_tokens

if TYPE_CHECKING:
    from astra.net.protocol import Comm

METHODS = GENERATING_METHODS  # astra run: the methods that produce tokens (astra.methods)
BASELINES = PREFILL_ONLY_METHODS  # tp, pp, bp: prefill-only baselines (astra bench)
MODES = ("auto", "processes", "composed")


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"  # a prepared model name or any local HF-format directory
    devices: int = 2  # N devices sharing the sequence
    bandwidth_mbps: float = 10.0  # each device's uplink
    latency_ms: float = 20.0  # one-way latency per message
    tokens: int = 1024  # prompt tokens (decoders) / text tokens (BERT); ViT: see image_size
    image_size: int = 448  # ViT input side: 448 px / 14 = 32x32 patches + CLS = 1025 tokens
    new_tokens: int = 16  # tokens generated after the prefill (decoders)
    groups: int = 1  # G
    codebook_size: int = 1024  # K
    quant_point: str | None = None  # None: the family's default ("kv" for Llama, else "hidden")
    artefact: str | None = None  # codebooks from `astra calibrate/finetune`; None: cached default
    methods: tuple[str, ...] = ("single", "astra", "sp-fp32")
    mode: str = "auto"
    placement: str = "contiguous"  # token -> device: contiguous, zigzag (balanced causal), random
    overlap: bool = True  # overlap the code exchange with local attention
    exchange: str = "auto"  # auto: stream causal prefills point-to-point, all-gather otherwise
    # decoding: remote K/V kept as codes and rebuilt every step (App. G), or rebuilt once
    remote_cache: str = "rebuilt"  # see GroupConfig.remote_cache
    use_tables: bool = False  # per-code projection tables for the "hidden" point
    timeout_s: float = 600.0  # the whole run (or one request in a warm group)
    peer_timeout_s: float = 30.0  # one collective / a silent device: named after this long
    loss_rate: float = 0.0  # probability that a packet of codes is lost (no retransmission)
    parity: int = 1  # lossy link: one XOR parity packet per this many data packets (0: none)
    prompt: str | None = None  # decoders: text to continue (default: Austen, `tokens` long)
    dtype: str = "float32"  # compute precision of every method, one of DTYPES
    weights: str = "full"  # how the blocks' weights are stored (full, int8, int4)
    search: str = "auto"  # ASTRA senders' nearest-code search precision, one of SEARCHES
    # heterogeneous devices (paper App. D): relative speed per device (1 = this machine's core,
    # 0.5 = half as fast), None = equal. The composed mode charges each device its measured
    # compute / speed; the placement sizes chunks from them (contiguous: tokens in proportion;
    # balanced: equal cost / speed). Processes mode cannot emulate them (see check_speeds_mode)
    device_speeds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.device_speeds is not None:
            speeds = check_device_speeds(self.device_speeds, self.devices)
            object.__setattr__(self, "device_speeds", speeds)
            PlacementConfig(self.devices, kind=self.placement, weights=speeds)  # zigzag: refused
            check_speeds_mode(speeds, self.resolved_mode())
        if self.tokens < self.devices:
            raise ValueError(f"tokens={self.tokens} must be >= devices={self.devices}")
        if not 0.0 <= self.loss_rate < 1.0:
            raise ValueError(f"loss rate must be in [0, 1), got {self.loss_rate}")
        if self.new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {self.new_tokens}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        check_methods(self.methods, METHODS)
        # the device group's own checks, in one place: link, codebooks, placement, exchange,
        # remote cache, precision, timeouts (GroupConfig, QuantConfig, LinkConfig)
        self.group_config()

    @property
    def link(self) -> LinkConfig:
        return LinkConfig(bandwidth_mbps=self.bandwidth_mbps, latency_ms=self.latency_ms)

    def group_config(self, warmup_tokens: int = 128) -> GroupConfig:
        """The device group this run describes (processes mode runs in it)."""
        generating = [m for m in self.methods if m != "single"]
        return GroupConfig(
            model=self.model,
            devices=self.devices,
            method=generating[0] if generating else "single",
            methods=tuple(self.methods),
            link=LinkConfig(
                self.bandwidth_mbps,
                self.latency_ms,
                loss_rate=self.loss_rate,
                loss_parity=self.parity,
            ),
            quant=QuantConfig(
                groups=self.groups,
                codebook_size=self.codebook_size,
                point=self.quant_point,
                artefact=self.artefact,
                search=self.search,
            ),
            dtype=self.dtype,
            weights=self.weights,
            placement=self.placement,
            exchange=self.exchange,
            remote_cache=self.remote_cache,
            overlap=self.overlap,
            use_tables=self.use_tables,
            start_timeout_s=self.timeout_s,
            request_timeout_s=self.timeout_s,
            peer_timeout_s=self.peer_timeout_s,
            warmup_tokens=warmup_tokens,
            reform=False,  # a run ends at its first failure; the user decides what next
        )

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        if emulates_speeds(self.device_speeds):
            return "composed"  # the only mode that can emulate slower devices
        return "processes" if self.devices <= (os.cpu_count() or 1) else "composed"


def emulates_speeds(speeds: tuple[float, ...] | None) -> bool:
    """Whether `speeds` ask for anything but this machine's own speed on every device."""
    return speeds is not None and any(s != 1.0 for s in speeds)


def check_speeds_mode(speeds: tuple[float, ...] | None, mode: str) -> None:
    """Device speeds other than 1 are emulated in the composed mode only. Real processes would
    need a slower CPU: fewer threads cannot do it (one thread per device is already the least,
    and thread scaling is far from linear for small models), and sleeping in proportion to the
    measured compute would leave the core idle where a slow device computes, hiding contention
    the composed mode never had to model. So processes mode refuses instead of pretending."""
    if emulates_speeds(speeds) and mode == "processes":
        shown = ",".join(f"{s:g}" for s in speeds)
        raise ValueError(
            f"device speeds {shown} are emulated in the composed mode only (each device's "
            "measured compute / its speed); processes mode runs every device at this machine's "
            "speed. Use --mode composed (auto picks it when speeds differ from 1)"
        )


@dataclass
class Job:
    """What every rank needs; small and picklable (weights are loaded on each device)."""

    method: str
    model_dir: str
    artefact: str | None
    inputs: dict
    placement: PlacementConfig
    class_tokens: str
    new_tokens: int
    link: LinkConfig
    timeout_s: float  # the whole job
    overlap: bool
    use_tables: bool
    decoder: bool
    exchange: str = "auto"
    remote_cache: str = "rebuilt"
    loss_rate: float = 0.0
    parity: int = 1
    decode: bool = True  # decoders: generate new_tokens after the prefill (False: TTFT only)
    warmup: bool = True  # one untimed pass first (allocators, math library start-up)
    pp_chunks: int = 4  # pipeline parallelism: sequence chunks (decoders; encoders use 1)
    bp_syncs: int = 1  # block parallelism: synchronisations Nb
    dtype: str = "float32"  # compute precision (DTYPES); codebooks stay float32
    weights: str = "full"  # how the blocks' weights are stored (astra.models.quantize.WEIGHTS)
    search: str = "auto"  # ASTRA senders' nearest-code search (SEARCHES)
    peer_timeout_s: float = 30.0  # one collective: a frozen peer is named after this long
    # composed mode: each rank's measured compute is charged / its speed (emulated
    # heterogeneous devices); None = every device at this machine's speed. What the placement
    # assumes is `placement.weights`, set separately (an equal split of unequal devices is
    # a valid experiment)
    device_speeds: tuple[float, ...] | None = None
    model: object = field(default=None, repr=False)  # composed mode: shared weights


def job_for(
    config: RunConfig,
    method: str,
    world_size: int,
    model_dir: Path,
    artefact: Path | None,
    inputs: dict,
    class_tokens: str,
    decoder: bool,
) -> Job:
    """The Job every rank runs for `method`, from the user's RunConfig (processes, composed
    mode and torchrun alike)."""
    resolve_exchange(config.exchange, decoder)  # "stream" on an encoder: a clear error, here
    # one device ("single") runs at this machine's speed: the reference is a speed-1 device
    speeds = config.device_speeds if world_size > 1 else None
    return Job(
        method=method,
        model_dir=str(model_dir),
        artefact=str(artefact) if artefact else None,
        inputs=inputs,
        placement=PlacementConfig(world_size, kind=config.placement, weights=speeds),
        class_tokens=class_tokens,
        new_tokens=config.new_tokens,
        link=config.link,
        timeout_s=config.timeout_s,
        peer_timeout_s=config.peer_timeout_s,
        overlap=config.overlap,
        exchange=config.exchange,
        remote_cache=config.remote_cache,
        use_tables=config.use_tables,
        decoder=decoder,
        loss_rate=config.loss_rate,
        parity=config.parity,
        dtype=config.dtype,
        weights=config.weights,
        search=config.search,
        device_speeds=speeds,
    )


# ensure_codebooks' training-free calibration; part of the cache key
CALIBRATION = {"num_sequences": 32, "max_samples": 8192, "kmeans_iters": 10}


def default_artefact(model_dir: Path, config: AstraConfig) -> Path:
    """Where calibrated codebooks are cached (or will be): keyed by the weights' checksum and
    every setting (codebook config + calibration), not by a model's name or directory, so the
    same weights under another name reuse them and changed weights never do."""
    from astra.hub import model_checksum

    checksum = model_checksum(model_dir)
    settings = json.dumps({**config.to_dict(), **CALIBRATION}, sort_keys=True)
    key = hashlib.sha256(f"{checksum}\n{settings}".encode()).hexdigest()[:16]
    folder = cache_dir() / "artefacts"
    path = folder / (
        f"calibrated-{config.quant_point}-g{config.num_groups}-k{config.codebook_size}"
        f"-{key}.safetensors"
    )
    # earlier versions cached the same calibration under the dir's name + checksum
    legacy = folder / (
        f"{model_dir.name}-{checksum[:12]}-{config.quant_point}-g{config.num_groups}"
        f"-k{config.codebook_size}.safetensors"
    )
    return legacy if not path.is_file() and legacy.is_file() else path


def _load(job: Job):
    model = job.model if job.model is not None else load_model(job.model_dir)
    quantizers = model.blocks
    if job.method == "astra":
        astra = load_astra(job.artefact, model, job.model_dir)
        quantizers = astra.quantizers
        model = astra.model
    prepare_weights_(model, job.dtype, job.weights)  # after any fine-tuned weights went in
    return model, quantizers


@torch.no_grad()
def rank_main(rank: int, world_size: int, comm: Comm, job: Job) -> dict:
    """One device's whole job: warm up, timed prefill, then decode on the last token's device."""
    model, quantizers = _load(job)
    now = comm.now
    x_full = embed_inputs(model, job.inputs)
    if job.method == "single":
        return _single(model, x_full, job, now)
    if job.method in BASELINES:
        return _baseline(rank, world_size, comm, model, x_full, job)
    class_tokens = effective_class_tokens(model, job.class_tokens)
    # warm-up and set-up traffic on an ideal link (the timed pass uses comm)
    warm = comm.__class__ is Communicator and Communicator(comm.group, LinkConfig(), job.timeout_s)
    codecs = make_codecs(job.method, quantizers, job.use_tables, search_kind(job.search))
    placement = fit_balanced_placement(
        job.placement,
        model,
        x_full,
        codecs,
        rank,
        warm or comm,
        job.exchange,
        job.overlap,
        job.warmup,
    )
    seq = build_sequence_layout(x_full.shape[1], placement, class_tokens)
    x_full = expand_class_tokens(x_full, seq.num_replicas)
    layout = build_rank_layout(seq, rank, world_size, getattr(model, "causal", False))
    decode_rank = int(seq.device_of_token[-1])
    # warm-up pass (allocators, lookup tables) on an ideal link, then the timed pass
    lossy = replace(job.link, loss_rate=job.loss_rate, loss_parity=job.parity)
    loss = PacketChannel.for_link(lossy, request_seed(job.inputs))
    if job.warmup:
        install_rank_attention(
            model, codecs, layout, warm or comm, job.overlap, loss=loss, exchange=job.exchange
        )
        sequence_parallel_forward(model, x_full, layout)
        (warm or comm).wait_sends()
    install_rank_attention(
        model, codecs, layout, comm, job.overlap, loss=loss, exchange=job.exchange
    )
    for block in model.blocks:
        block.attn.timings = {}  # where the time goes, per stage (a few clock reads per block)
        if job.decoder and job.decode and rank == decode_rank:
            block.attn.capture = {}
    comm.stats.reset()
    comm.barrier()
    t0 = now()
    with comm.stats.phase("prefill"):
        hidden = sequence_parallel_forward(model, x_full, layout)
    out: dict = {"rank": rank, "tokens": int(layout.local_index.numel())}
    if placement.cost is not None:  # balanced: the fitted costs that sized the chunks
        out["placement_cost"] = asdict(placement.cost)
    out["lost_remote_tokens"] = sum(block.attn.lost_tokens for block in model.blocks)
    if job.decoder:
        if rank == decode_rank:
            logits = model.head(hidden[:, -1:])
            first = int(logits.argmax(-1))
            out["ttft_ms"] = (now() - t0) * 1e3
            out["breakdown_ms"] = stage_breakdown(model, out["ttft_ms"])
            if job.decode:
                steps, tpot, cache = _decode(
                    model, first, x_full.shape[1], job.new_tokens, now, job.remote_cache
                )
                out.update(generated=[first] + steps, tpot_ms=tpot, kv_cache=cache)
        if "ttft_ms" not in out:
            out["prefill_ms"] = (now() - t0) * 1e3
            out["breakdown_ms"] = stage_breakdown(model, out["prefill_ms"])
        else:
            out["prefill_ms"] = out["ttft_ms"]
    else:
        with comm.stats.phase("output"):
            output = encoder_output(model, hidden, layout, seq, comm)
        out["prefill_ms"] = out["ttft_ms"] = (now() - t0) * 1e3
        out["output"] = output
        out["breakdown_ms"] = stage_breakdown(model, out["prefill_ms"])
    comm.wait_sends()  # streamed codes: delivered before this rank's numbers are final
    out["distinct_code_share"] = distinct_code_share(model)  # after the clock: bookkeeping
    out["comm"] = comm.stats.to_dict()
    return out


def fit_balanced_placement(
    placement: PlacementConfig,
    model,
    x_full: torch.Tensor,
    codecs,
    rank: int,
    comm,
    exchange: str,
    overlap: bool,
    warmup: bool = True,
) -> PlacementConfig:
    """Fill in what "balanced" placement needs: the CausalCost of this model on this machine,
    fitted from one pass of the real runtime with contiguous chunks on an ideal link (every
    rank times its stages, all gather them, all fit the same numbers). Encoders get equal
    chunks (every token sees every key). Measured rather than counted: on this CPU one
    query-key pair of SmolLM2 costs about 3x what its FLOPs say, and the nearest-code search
    about a third of a token's linear layers, which a FLOP count of attention alone misses."""
    if placement.kind != "balanced" or placement.cost is not None:
        return placement
    if not getattr(model, "causal", False) or placement.num_devices == 1:
        return replace(placement, cost=CausalCost())
    exchange = resolve_exchange(exchange, True)
    contiguous = replace(placement, kind="contiguous")
    layout = build_rank_layout(
        build_sequence_layout(x_full.shape[1], contiguous, "none"),
        rank,
        placement.num_devices,
        True,
    )
    install_rank_attention(model, codecs, layout, comm, overlap, exchange=exchange)
    for _ in range(2 if warmup else 1):  # with a warm-up pass first, time the second
        for block in model.blocks:
            block.attn.timings = {}
        comm.barrier()
        t0 = comm.now()
        sequence_parallel_forward(model, x_full, layout)
        stages = stage_breakdown(model, (comm.now() - t0) * 1e3)
        comm.wait_sends()
    tokens = int(layout.local_index.numel())
    # a device of speed s took 1/s of a speed-1 device's time: fit the speed-1 costs, then
    # size the chunks for cost / speed (causal_balanced_sizes)
    speed = placement.weights[rank] if placement.weights is not None else 1.0
    stages = {name: ms * speed for name, ms in stages.items()}
    mine = {
        "tokens": tokens,
        "earlier": int(layout.local_index.min()),  # contiguous: the tokens before this chunk
        "sends": float(bool(model.blocks[0].attn.sends)),
        "linear": stages.get("project", 0.0) + stages.get("mlp_and_rest", 0.0),
        "encode": stages.get("encode", 0.0),
        "local": stages.get("local_attention", 0.0),
        "remote": stages.get("remote_attention", 0.0),
        "rebuild": stages.get("rebuild_remote", 0.0),
    }
    row = torch.tensor([[float(mine[f]) for f in COST_FIELDS]], dtype=torch.float64)
    records = [dict(zip(COST_FIELDS, r[0].tolist())) for r in comm.all_gather_tensor(row)]
    cost = fit_causal_cost(records, last_encodes=exchange == "all-gather")
    return replace(placement, cost=cost)


def _baseline(rank: int, world_size: int, comm, model, x_full: torch.Tensor, job: Job) -> dict:
    """Tensor, pipeline or block parallelism: one timed prefill (issue 4 baselines)."""
    from astra.parallel.block_parallel import apply_block_parallel_, bp_forward
    from astra.parallel.pipeline import pp_rank_forward
    from astra.parallel.tensor_parallel import apply_tensor_parallel_, tp_forward

    causal = getattr(model, "causal", False)
    if job.method == "tp":
        apply_tensor_parallel_(model, rank, world_size, comm)
        run = lambda: tp_forward(model, x_full)  # noqa: E731
    elif job.method == "bp":
        apply_block_parallel_(model, rank, world_size, comm)
        run = lambda: bp_forward(rank, world_size, comm, model, x_full, job.bp_syncs).hidden  # noqa: E731
    else:
        chunks = job.pp_chunks if causal else 1
        wire = check_dtype(job.dtype)  # hidden states cross in the compute precision
        run = lambda: pp_rank_forward(rank, world_size, comm, model, x_full, chunks, wire)  # noqa: E731
    if job.warmup:
        run()
        if hasattr(comm, "wait_sends"):
            comm.wait_sends()
    comm.stats.reset()
    comm.barrier()
    t0 = comm.now()
    with comm.stats.phase("prefill"):
        hidden = run()
        if hidden is not None and causal:
            model.head(hidden[:, -1:])  # the first token's logits, where the last token is
    elapsed_ms = (comm.now() - t0) * 1e3
    if hasattr(comm, "wait_sends"):
        comm.wait_sends()
    return {
        "rank": rank,
        "tokens": int(x_full.shape[1]),
        "ttft_ms": elapsed_ms,
        "prefill_ms": elapsed_ms,
        "comm": comm.stats.to_dict(),
    }


def _decode(model, first: int, start: int, new_tokens: int, now, remote_cache: str = "codes"):
    """Greedy decoding on the decode device with the captured cache (remote part as codes, or
    rebuilt once: that one-off rebuild is counted in the time per output token)."""
    t0 = now()
    for block in model.blocks:
        block.attn = DecodeAttention(block.attn, block.attn.capture, remote_cache)
    token, steps = first, []
    for i in range(new_tokens - 1):
        token = int(decode_step(model, token, start + i).argmax(-1))
        steps.append(token)
    tpot = (now() - t0) * 1e3 / max(new_tokens - 1, 1)
    return steps, tpot, decode_cache_bytes(model)


def _single(model, x_full: torch.Tensor, job: Job, now) -> dict:
    """The single-device reference on the same input: full precision, KV cache for decoding."""

    def prefill(caches):
        positions = torch.arange(x_full.shape[1])
        mask = None
        if getattr(model, "causal", False):
            from astra.models import causal_mask

            mask = causal_mask(positions, positions)
        x = x_full
        for i, block in enumerate(model.blocks):
            x = block(x, positions, mask, cache=caches[i]) if caches else block(x, positions, mask)
        return x

    if getattr(model, "causal", False):
        use_causal_kernel_(model)  # the fastest exact kernel for the reference too
    if job.warmup:
        prefill([KVCache() for _ in model.blocks] if job.decoder else None)
    t0 = now()
    caches = [KVCache() for _ in model.blocks] if job.decoder else None
    hidden = prefill(caches)
    restore_attention_(model)
    out: dict = {"rank": 0, "tokens": int(x_full.shape[1])}
    if job.decoder:
        token = int(model.head(hidden[:, -1:]).argmax(-1))
        out["ttft_ms"] = (now() - t0) * 1e3
        generated = [token]
        t1 = now()
        for i in range(job.new_tokens - 1 if job.decode else 0):
            token = int(decode_step(model, token, x_full.shape[1] + i, caches).argmax(-1))
            generated.append(token)
        out["tpot_ms"] = (now() - t1) * 1e3 / max(job.new_tokens - 1, 1)
        out["generated"] = generated
        out["prefill_ms"] = out["ttft_ms"]
    else:
        out["output"] = pool_output(model, model.head(hidden))
        out["prefill_ms"] = out["ttft_ms"] = (now() - t0) * 1e3
    out["comm"] = {"bytes_sent": 0, "bytes_received": 0, "comm_ms": 0.0, "wait_ms": 0.0}
    return out


def _worker(rank: int, world_size: int, group, job: Job) -> dict:
    comm = Communicator(group, job.link, timeout_s=job.peer_timeout_s)
    return rank_main(rank, world_size, comm, job)


def run_method(job: Job, world_size: int, mode: str) -> dict:
    """Run one method on world_size devices; returns its summary record."""
    return summarize(job, run_ranks(job, world_size, mode), world_size, mode)


def run_ranks(job: Job, world_size: int, mode: str) -> list[dict]:
    """Every rank's result for one method: real processes, or the composed (lockstep) mode."""
    if mode == "processes":
        check_speeds_mode(job.device_speeds, mode)
        results = spawn(
            _worker,
            world_size,
            args=(job,),
            threads_per_worker=1,
            timeout_s=job.timeout_s,
            collective_timeout_s=job.peer_timeout_s,
        )
    else:
        base = job.model if job.model is not None else load_model(job.model_dir)
        jobs = []
        for _ in range(world_size):
            jobs.append(dataclasses.replace(job, model=share_weights_copy(base)))
        results, _, _ = run_lockstep(
            lambda r, n, c: rank_main(r, n, c, jobs[r]),
            world_size,
            job.link,
            timeout_s=job.timeout_s,
            speeds=job.device_speeds,
        )
    return results


def summarize(job: Job, results: list[dict], world_size: int, mode: str) -> dict:
    """Every rank's statistics as the one result record (astra.group.records), as a dict."""
    record = record_from_ranks(
        job.method,
        results,
        mode=mode if job.method != "single" else "processes",
        dtype=job.dtype,
        search=search_kind(job.search),
        prompt_tokens=num_input_tokens(job.model_dir, job.inputs),
        weights=job.weights,
    ).to_dict()
    if job.device_speeds is not None:
        record["device_speeds"] = list(job.device_speeds)
    for key, value in (
        ("generated_ids", next((r["generated"] for r in results if "generated" in r), None)),
        ("output", next((r["output"] for r in results if "output" in r), None)),
    ):
        if value is not None:
            record[key] = value
    return record


def build_inputs(config: RunConfig, model_dir: Path) -> tuple[dict, bool, str]:
    """The built-in input for the model's family: (inputs, is_decoder, description)."""
    kind = model_kind(model_dir)
    check_context(model_dir, config.tokens, config.new_tokens if kind == "decoder" else 0)
    if kind == "image-encoder":
        from astra.datasets import sample_photos
        from astra.models import image_transform

        photo = sample_photos()["astronaut"]
        pixels = image_transform(model_dir, config.image_size)(photo)[None]
        return {"pixels": pixels}, False, f"scikit-image 'astronaut' at {config.image_size} px"
    from astra.text import encode, windows  # one tokenization rule: run, eval, serve

    tokenizer = load_tokenizer(model_dir)
    if config.prompt is not None:
        ids = torch.tensor([encode(tokenizer, config.prompt)])[:, : config.tokens]
        return {"input_ids": ids}, kind == "decoder", "the given prompt"
    from astra.datasets import austen_text

    # a decoder continues running text (BOS first if the tokenizer adds one); an encoder's
    # passage is a whole input ([CLS] ... [SEP])
    ids = windows(tokenizer, austen_text("test"), config.tokens, 1, closed=kind != "decoder")
    return {"input_ids": ids}, kind == "decoder", "held-out Austen text"


def check_context(model_dir: Path, tokens: int, new_tokens: int = 0) -> None:
    """Before any work: the prompt (and the tokens to generate) fit the model's context."""
    limit = context_length(model_dir)
    if limit is None or tokens + new_tokens <= limit:
        return
    asked = f"--tokens {tokens}" + (f" + --new-tokens {new_tokens}" if new_tokens else "")
    raise ValueError(
        f"{asked} = {tokens + new_tokens} positions exceed the model's context of {limit} "
        f"(max_position_embeddings of {model_dir.name}); use --tokens {limit - new_tokens} "
        "or fewer"
    )


def ensure_artefact(config: RunConfig, model_dir: Path, progress: bool = True) -> Path:
    """The codebooks a RunConfig asks for (see ensure_codebooks)."""
    quant = QuantConfig(
        groups=config.groups,
        codebook_size=config.codebook_size,
        point=config.quant_point,
        artefact=config.artefact,
    )
    return ensure_codebooks(model_dir, quant, config.model, progress)


def ensure_codebooks(
    model_dir: Path, quant: QuantConfig, model_label: str, progress: bool = True
) -> Path:
    """The codebooks to run with: the given artefact, or the cached default (calibrated now,
    training-free, if it does not exist yet)."""
    if quant.artefact is not None:
        path = Path(quant.artefact).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"no codebook artefact at {path}; make one with `astra calibrate --model "
                f"{model_label}` or leave out --artefact to calibrate and cache one"
            )
        return path
    from astra.parallel.simulate import apply_astra
    from astra.parallel.train import calibrate_
    from astra.tasks import make_task

    model = load_model(model_dir)
    task = make_task(model, model_dir)
    astra_config = AstraConfig(
        quant_point=quant.point or task.quant_point,
        num_groups=quant.groups,
        codebook_size=quant.codebook_size,
        class_tokens=task.class_tokens,
    )
    path = default_artefact(model_dir, astra_config)
    if not path.is_file():
        from astra.parallel.artefact import save_artefact

        astra = apply_astra(model, astra_config)
        calibrate_(astra, task, **CALIBRATION, progress=progress)
        save_artefact(path, astra, model_dir, extra={"mode": "calibrated (training-free)"})
    return path


def run_inference(config: RunConfig, progress: bool = True, log=print) -> dict:
    """Every method of `config` on the same input and link, measured side by side: in one warm
    device group (real processes, astra.group.Group) or in the composed mode."""
    model_dir = resolve_model(config.model)
    inputs, decoder, description = build_inputs(config, model_dir)
    if config.resolved_mode() == "processes":
        records, artefact = _run_in_group(config, inputs, decoder, progress, log)
    else:
        records, artefact = _run_composed(config, model_dir, inputs, decoder, progress, log)
    single = next((r for r in records if r["method"] == "single"), None)
    for r in records:
        if single is not None:
            r["speedup_vs_single"] = single["ttft_ms"] / r["ttft_ms"]
    if single is not None and "output" in single:  # encoders: how close each output is
        for r in records:
            if "output" in r:
                cos = torch.nn.functional.cosine_similarity(r["output"], single["output"], dim=0)
                r["cosine_to_single"] = float(cos)
    sp = next((r for r in records if r["method"] == "sp-fp32"), None)
    astra_rec = next((r for r in records if r["method"] == "astra"), None)
    if sp is not None and astra_rec is not None:
        astra_rec["speedup_vs_sp_fp32"] = sp["ttft_ms"] / astra_rec["ttft_ms"]
    summary = {
        "model": str(config.model),
        "model_dir": str(model_dir),
        "input": description,
        "config": {k: v for k, v in asdict(config).items()},
        "artefact": str(artefact) if artefact else None,
        "records": records,
    }
    if decoder:
        tokenizer = load_tokenizer(model_dir)
        summary["prompt_tail"] = tokenizer.decode(inputs["input_ids"][0, -40:])
        for r in records:
            if "generated_ids" in r:
                r["completion"] = tokenizer.decode(r["generated_ids"])
    return summary


def _run_in_group(config: RunConfig, inputs: dict, decoder: bool, progress: bool, log):
    """Every method through one group of warm worker processes: single runs on device 0 of
    the same processes, so no method pays a start-up the others do not."""
    from astra.group import Group
    from astra.sampling import Sampling

    records = []
    log(f"starting {config.devices} device(s) (load, codebooks, one warm-up pass per method)...")
    with Group(config.group_config(), progress, warmup_inputs=inputs) as group:
        if group.degraded or group.devices != config.devices:
            raise RuntimeError("the device group did not start on every device")
        for method in config.methods:
            log(f"running {method} on {1 if method == 'single' else config.devices} device(s)...")
            t0 = time.perf_counter()
            if decoder:
                greedy = Sampling(max_tokens=config.new_tokens, temperature=0.0, ignore_eos=True)
                ids = inputs["input_ids"][0].tolist()
                out = group.generate(ids, greedy, method=method)
                record = out.record.to_dict()
                record["generated_ids"] = out.token_ids
            else:
                encoded = group.encode(inputs, method=method)
                record = encoded.record.to_dict()
                record["output"] = torch.tensor(encoded.vector)
            record["wall_s"] = round(time.perf_counter() - t0, 2)
            records.append(record)
        return records, group.artefact


def _run_composed(config: RunConfig, model_dir: Path, inputs, decoder, progress, log):
    """Every method in the composed mode (more devices than cores; astra.net.lockstep)."""
    artefact = ensure_artefact(config, model_dir, progress) if "astra" in config.methods else None
    class_tokens = model_spec(model_dir).class_tokens
    quant = {}
    if artefact is not None:
        quant = codebook_summary(artefact, model_dir)
        class_tokens = quant.pop("class_tokens")
    mode = config.resolved_mode()
    records = []
    for method in config.methods:
        world = 1 if method == "single" else config.devices
        job = job_for(config, method, world, model_dir, artefact, inputs, class_tokens, decoder)
        log(f"running {method} on {world} device(s)...")
        t0 = time.perf_counter()
        records.append(run_method(job, world, "processes" if method == "single" else mode))
        records[-1]["wall_s"] = round(time.perf_counter() - t0, 2)
        if method == "astra":
            records[-1].update(quant)
    return records, artefact


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def run_torchrun(config: RunConfig, log=print) -> dict | None:
    """This process is one rank started by torchrun (possibly on another machine): run ASTRA on
    the real network (plus any emulated link in `config`) and return the summary on rank 0.

    Every rank loads the weights and codebooks from its own disk: nothing weight-sized crosses
    the link. The codebooks must exist on every machine (same artefact, checked by checksum).
    """
    import torch.distributed as dist

    from astra.net.launch import init_from_env

    rank, world_size, group = init_from_env("auto", config.peer_timeout_s)
    try:
        model_dir = resolve_model(config.model)
        inputs, decoder, description = build_inputs(config, model_dir)
        if config.artefact is None and rank != 0:
            dist.barrier(group)  # rank 0 calibrates (if needed) into the shared cache first
        artefact = ensure_artefact(config, model_dir, progress=rank == 0)
        if config.artefact is None and rank == 0:
            dist.barrier(group)
        class_tokens = codebook_summary(artefact, model_dir)["class_tokens"]
        job = job_for(
            config, "astra", world_size, model_dir, artefact, inputs, class_tokens, decoder
        )
        comm = Communicator(group, config.link, timeout_s=config.peer_timeout_s)
        result = rank_main(rank, world_size, comm, job)
        # the results travel as JSON on an ideal link: not charged, never unpickled
        ideal = Communicator(group, LinkConfig(), timeout_s=config.peer_timeout_s)
        gathered = all_gather_json(ideal, result)
        dist.barrier(group)  # every rank has its results before the group goes away
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    record = summarize(job, gathered, world_size, "torchrun")
    summary = {
        "model": str(config.model),
        "model_dir": str(model_dir),
        "input": description,
        "config": asdict(config),
        "artefact": str(artefact),
        "records": [record],
    }
    if decoder and "generated_ids" in record:
        tokenizer = load_tokenizer(model_dir)
        summary["prompt_tail"] = tokenizer.decode(inputs["input_ids"][0, -40:])
        record["completion"] = tokenizer.decode(record["generated_ids"])
    return summary
