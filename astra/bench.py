"""`astra bench`: every strategy side by side on the same emulated links (issue 4).

One record per (method, devices, tokens, bandwidth): the prefill (encoder pass or time to the
first token's logits) of one input, with compute/communication/wait time and bytes per device.

Methods, all in the same runtime (astra.net communicators) and on the same link model:
- `single`: one device, the reference;
- `astra`: ASTRA (codes on the wire; G, K and quantization point as configured);
- `sp-fp32`, `sp-fp16`: full-precision sequence parallelism (Voltage);
- `tp`: Megatron tensor parallelism (two all-reduces per block);
- `pp`: pipeline parallelism with chunked prefill (Petals, exo, prima.cpp);
- `bp`: block parallelism (DeTransformer), **latency only: it changes the model**.

Codebook values do not change the time of a pass, so unless an artefact is given the bench
builds timing codebooks from real activations without K-means iterations (labelled so).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from astra.group.config import QuantConfig
from astra.hub import resolve_model
from astra.methods import METHODS, SEQUENCE_PARALLEL_METHODS
from astra.models import load_model, model_family, model_kind, model_spec
from astra.net.link import LinkConfig
from astra.parallel.artefact import save_artefact
from astra.parallel.config import AstraConfig
from astra.parallel.passes import check_dtype, embed_inputs, search_kind
from astra.parallel.placement import PlacementConfig, check_device_speeds
from astra.parallel.runtime import EXCHANGES, resolve_exchange
from astra.parallel.simulate import apply_astra
from astra.provenance import provenance
from astra.runner import (
    Job,
    RunConfig,
    build_inputs,
    check_context,
    check_speeds_mode,
    default_artefact,
    run_ranks,
    summarize,
)
from astra.storage import atomic_path, write_json, write_text

BENCH_METHODS = tuple(METHODS)  # every method in astra.methods, prefill-only baselines too


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    devices: tuple[int, ...] = (2, 4)
    bandwidths_mbps: tuple[float, ...] = (10.0, 100.0, 1000.0)
    latency_ms: float = 20.0
    tokens: tuple[int, ...] = (512,)  # text models; ViT: tokens = (side/14)^2 + 1
    methods: tuple[str, ...] = BENCH_METHODS
    groups: int = 1
    codebook_size: int = 1024
    quant_point: str | None = None
    artefact: str | None = None
    mode: str = "composed"  # composed (deterministic, any N) or processes (N <= cores)
    placement: str = "contiguous"
    pp_chunks: int = 4  # pipeline chunks for decoders (encoders: 1)
    bp_syncs: int = 1  # Nb for block parallelism
    overlap: bool = True
    exchange: str = "auto"  # see astra.parallel.runtime: stream causal prefills, else all-gather
    use_tables: bool = False  # hidden point: rebuild remote K/V with per-code projection tables
    timeout_s: float = 900.0  # one method's run
    peer_timeout_s: float = 30.0  # one collective (processes mode): a frozen device is named
    # every (method, devices, bandwidth, tokens) run this many times, interleaved (all methods
    # once, then all again): a record keeps the median pass, its speed-up is median over median
    repeats: int = 1
    dtype: str = "float32"  # compute precision of every method (astra.runner.DTYPES)
    search: str = "auto"  # ASTRA senders' nearest-code search (astra.runner.SEARCHES)
    # heterogeneous devices (App. D): relative speed per device, one per device of every count
    # in `devices`; composed mode only (astra.runner.RunConfig.device_speeds). The single-device
    # reference runs at speed 1; SP methods' placement uses them (contiguous: tokens in
    # proportion, balanced: equal cost / speed), tp/pp/bp only run at them
    device_speeds: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in BENCH_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods {list(self.methods)}: each must be one of {BENCH_METHODS}")
        if self.mode not in ("composed", "processes"):
            raise ValueError(f"mode {self.mode!r} must be 'composed' or 'processes'")
        if not self.devices or min(self.devices) < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.mode == "processes" and max(self.devices) > (os.cpu_count() or 1):
            raise ValueError(
                f"processes mode needs one core per device: {max(self.devices)} devices, "
                f"{os.cpu_count()} cores; use --mode composed"
            )
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange {self.exchange!r} is not one of {EXCHANGES}")
        if not self.bandwidths_mbps or min(self.bandwidths_mbps) <= 0:
            raise ValueError(f"bandwidths must be > 0 Mbit/s, got {self.bandwidths_mbps}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.device_speeds is not None:
            for n in self.devices:
                speeds = check_device_speeds(self.device_speeds, n)
                PlacementConfig(n, kind=self.placement, weights=speeds)  # zigzag: refused
            object.__setattr__(self, "device_speeds", speeds)
            check_speeds_mode(speeds, self.mode)
        check_dtype(self.dtype)
        QuantConfig(  # the codebook fields' own checks (one place)
            groups=self.groups,
            codebook_size=self.codebook_size,
            point=self.quant_point,
            artefact=self.artefact,
            search=self.search,
        )


def timing_artefact(model_dir: Path, config: AstraConfig, inputs: dict, path: Path) -> Path:
    """Codebooks from real activations of this input, no K-means iterations: the right shapes
    at no calibration cost. Drawn from the very tokens timed, they give nearly every remote
    token a code of its own (99.9 % distinct for DINOv2-S), so models that attend to each
    distinct remote code once are timed at their slowest: bench_codebooks prefers calibrated
    ones."""
    model = load_model(model_dir)
    astra = apply_astra(model, config)
    x = embed_inputs(model, inputs)
    recorded = astra.record_quant_inputs(lambda: astra.forward_hidden(x, None))
    for quantizer, parts in zip(astra.quantizers, recorded):
        for codebook, samples in zip(quantizer.codebooks, parts):
            codebook.kmeans_init_(samples, num_iters=0, init="random")
    save_artefact(path, astra, model_dir, extra={"mode": "timing-only codebooks"})
    return path


def bench_codebooks(
    model_dir: Path, config: AstraConfig, inputs: dict, tmp: Path, tokens: int, log
) -> Path:
    """The codebooks a bench times without --artefact: the calibrated ones `astra run` would
    use, when they are cached, else timing-only ones. Timing depends on the codes since
    encoders attend to each distinct remote code once: timing-only codebooks are drawn from
    the very tokens timed, so nearly every remote token gets a code of its own (DINOv2-S: 511
    -512 distinct of 512 per block, against 68-220 with calibrated codebooks)."""
    cached = default_artefact(model_dir, config)
    if cached.is_file():
        return cached
    log(
        f"bench: no calibrated codebooks cached for {model_dir.name} ({config.quant_point}, "
        f"G={config.num_groups}, K={config.codebook_size}): timing with timing-only codebooks; "
        f"`astra run` with the same settings calibrates and caches them"
    )
    return timing_artefact(model_dir, config, inputs, tmp / f"timing-{tokens}.safetensors")


def run_bench(config: BenchConfig, progress: bool = True, log=print) -> list[dict]:
    model_dir = resolve_model(config.model)
    family = model_family(model_dir)
    decoder = model_kind(model_dir) == "decoder"
    resolve_exchange(config.exchange, decoder)  # "stream" on an encoder: a clear error, first
    for tokens in config.tokens:
        check_context(model_dir, tokens)
    tmp = Path(tempfile.mkdtemp(prefix="astra-bench-"))
    base = load_model(model_dir)
    plan = []
    for tokens in config.tokens:
        side = max(14, round(math.sqrt(max(tokens - 1, 1))) * 14)
        run_cfg = RunConfig(
            model=config.model, tokens=tokens, image_size=side, devices=1, new_tokens=1
        )
        inputs, _, _ = build_inputs(run_cfg, model_dir)
        for n in config.devices:
            for bw in config.bandwidths_mbps:
                for method in config.methods:
                    if method == "single" and (
                        n != config.devices[0] or bw != config.bandwidths_mbps[0]
                    ):
                        continue  # one single-device reference per token count
                    plan.append((tokens, inputs, n, bw, method))
    artefacts: dict[int, Path] = {}
    # warm up the math libraries once, outside any timed pass: in composed mode every method
    # runs in this process, and the first (the single device) would otherwise time a cold pass;
    # one whole forward at the first size. Processes mode times only in its workers, which
    # warm themselves (Job.warmup), so this process has nothing to warm.
    if config.mode == "composed":
        with torch.no_grad():
            x = embed_inputs(base, plan[0][1])  # (1, T, D)
            positions = torch.arange(x.shape[1])
            for block in base.blocks:
                x = block(x, positions, None)
    setup = _Setup(config, model_dir, family, decoder, base, tmp, artefacts, log)
    # Interleaved repeats: this VM's speed drifts by 20-30 % over minutes (noisy neighbours), so
    # each repeat runs every plan entry once and the methods of one repeat are side by side.
    runs: list[list[dict]] = [[] for _ in plan]
    bar = tqdm(total=len(plan) * config.repeats, desc="bench", disable=not progress)
    try:
        for repeat in range(config.repeats):
            for i, (tokens, inputs, n, bw, method) in enumerate(plan):
                bar.set_postfix_str(f"{method} x{n} {bw:g}mbit T={tokens} #{repeat + 1}")
                runs[i].append(_run_one(setup, tokens, inputs, n, bw, method))
                bar.update()
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)  # timing codebooks: ~100 MB per token count
    records = [_median_record(r) for r in runs]
    singles = {r["tokens"]: r for r in records if r["method"] == "single" and "total_ms" in r}
    for r in records:
        single = singles.get(r["tokens"])
        if "total_ms" in r:
            r["speedup_vs_single"] = (
                round(single["total_ms"] / r["total_ms"], 4) if single else None
            )
            if single and config.repeats > 1:  # each repeat's ratio, side by side in time
                r["speedup_per_repeat"] = (
                    [  # pairs up repeats only when none was skipped
                        round(s / t, 4) for s, t in zip(single["repeats_ms"], r["repeats_ms"])
                    ]
                    if len(single["repeats_ms"]) == len(r["repeats_ms"])
                    else None
                )
                # noise only ever slows a pass down: the fastest pass of each is the least
                # disturbed one, and their ratio the conservative figure when singles drift
                r["speedup_best"] = round(min(single["repeats_ms"]) / min(r["repeats_ms"]), 4)
            if single:  # splitting's overhead: every device's compute over one device's
                r["work_vs_single"] = round(
                    sum(r["compute_ms_per_device"]) / sum(single["compute_ms_per_device"]), 4
                )
    return records


def work_breakdown(results: list[dict]) -> dict[str, float]:
    """Each stage's time summed over every device, waits left out: where the work of splitting
    goes (the senders' code search, rebuilding remote keys/values, split attention), to set
    against one device's whole pass. Empty for methods without per-stage timers."""
    total: dict[str, float] = {}
    for r in results:
        for stage, ms in r.get("breakdown_ms", {}).items():
            if stage != "wait":
                total[stage] = total.get(stage, 0.0) + ms
    return {k: round(v, 2) for k, v in total.items()}


def _median_record(runs: list[dict]) -> dict:
    """The run with the median total of one plan entry, with every timed repeat's total.

    Repeats that were skipped (a failed run) are counted, not timed; the entry is skipped only
    if every repeat was."""
    timed = [r for r in runs if "skipped" not in r]
    if not timed:
        return runs[0]
    ordered = sorted(timed, key=lambda r: r["total_ms"])
    record = dict(ordered[(len(ordered) - 1) // 2])  # lower median: a real pass, not a mean
    record["repeats_ms"] = [r["total_ms"] for r in timed]
    if len(timed) < len(runs):
        record["skipped_repeats"] = len(runs) - len(timed)
    return record


@dataclass
class _Setup:
    """What every run of one bench shares."""

    config: BenchConfig
    model_dir: Path
    family: str
    decoder: bool
    base: torch.nn.Module  # the composed mode's shared weights
    tmp: Path  # timing artefacts go here
    artefacts: dict[int, Path]  # timing artefact per token count, built on first use
    log: object


def _run_one(setup: _Setup, tokens: int, inputs: dict, n: int, bw: float, method: str) -> dict:
    """One timed prefill of `method` on `n` devices: its record (or a skipped one)."""
    config, model_dir, family, decoder = setup.config, setup.model_dir, setup.family, setup.decoder
    base, tmp, artefacts, log = setup.base, setup.tmp, setup.artefacts, setup.log
    artefact = None
    class_tokens = model_spec(model_dir).class_tokens
    astra_config = AstraConfig(
        quant_point=config.quant_point or model_spec(model_dir).quant_point,
        num_groups=config.groups,
        codebook_size=config.codebook_size,
        class_tokens=class_tokens,
    )
    if method == "astra":
        if config.artefact:
            from astra.parallel.artefact import read_artefact

            artefact = Path(config.artefact)
            # the record says which codebooks ran: the artefact's, not the flags'
            astra_config = AstraConfig(**read_artefact(artefact, model_dir)["config"])
            class_tokens = astra_config.class_tokens
        elif tokens not in artefacts:
            artefacts[tokens] = bench_codebooks(model_dir, astra_config, inputs, tmp, tokens, log)
        artefact = artefact or artefacts[tokens]
    world = 1 if method == "single" else n
    speeds = config.device_speeds if world > 1 else None  # the reference: a speed-1 device
    job = Job(
        method=method,
        model_dir=str(model_dir),
        artefact=str(artefact) if artefact else None,
        inputs=inputs,
        placement=PlacementConfig(world, kind=config.placement, weights=speeds),
        class_tokens=class_tokens,
        new_tokens=1,
        link=LinkConfig(bandwidth_mbps=bw, latency_ms=config.latency_ms),
        timeout_s=config.timeout_s,
        peer_timeout_s=config.peer_timeout_s,
        overlap=config.overlap,
        exchange=config.exchange,
        use_tables=config.use_tables,
        decoder=decoder,
        decode=False,  # the bench times the prefill (time to the first token's logits)
        warmup=config.mode == "processes",  # fresh processes: warm the math libraries
        pp_chunks=config.pp_chunks,
        bp_syncs=config.bp_syncs,
        dtype=config.dtype,
        search=config.search,
        model=base if config.mode == "composed" else None,
        device_speeds=speeds,
    )
    t0 = time.perf_counter()
    try:
        results = run_ranks(job, world, config.mode)
    except (ValueError, RuntimeError) as exc:  # e.g. more pipeline stages than layers
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else exc
        log(f"skipped {method} x{world}: {cause}")
        return {
            "method": method,
            "devices": world,
            "tokens": tokens,
            "bandwidth_mbps": bw,
            "skipped": str(cause),
        }
    record = _record(config, job, world, tokens, bw, results, family, astra_config, decoder)
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    return record


def _record(config, job, world, tokens, bw, results, family, astra_config, decoder) -> dict:
    """The shared record (astra.group.records) plus the bench's columns: the slowest
    device's totals, the link, the exchange and where the codebooks came from."""
    method, artefact = job.method, job.artefact
    # stats were reset right before the timed pass: the totals are that pass (the baselines
    # file their traffic under their own phases, e.g. tp.attn, pp, bp.sync)
    shared = summarize(job, results, world, config.mode)
    if method == "astra":
        shared.update(
            groups=astra_config.num_groups,
            codebook_size=astra_config.codebook_size,
            quant_point=astra_config.quant_point,
        )
    prefill = [r["comm"] for r in results]
    total = max(r["prefill_ms"] for r in results)
    slowest = max(range(len(results)), key=lambda i: results[i]["prefill_ms"])
    comm_ms = prefill[slowest]["comm_ms"]
    return shared | {
        "method": method,
        "model": config.model,
        "family": family,
        "devices": world,
        "tokens": tokens,
        "bandwidth_mbps": bw,
        "latency_ms": config.latency_ms,
        "groups": astra_config.num_groups if method == "astra" else None,
        "codebook_size": astra_config.codebook_size if method == "astra" else None,
        "quant_point": astra_config.quant_point if method == "astra" else None,
        "total_ms": round(total, 3),
        "compute_ms": round(total - comm_ms, 3),
        "comm_ms": round(comm_ms, 3),
        "wait_ms": round(prefill[slowest]["wait_ms"], 3),
        "bytes_per_device": max(int(r["comm"]["bytes_sent"]) for r in results),
        "bytes_received_per_device": max(int(r["comm"]["bytes_received"]) for r in results),
        "mode": config.mode if method != "single" else f"{config.mode} (1 device)",
        "changes_model": method == "bp",
        "breakdown_ms": {
            k: round(v, 2) for k, v in results[slowest].get("breakdown_ms", {}).items()
        },
        "dtype": config.dtype,
        "search": search_kind(config.search) if method == "astra" else None,
        "tables": config.use_tables if method == "astra" else None,
        "placement": config.placement,
        "tokens_per_device": [r.get("tokens") for r in results],
        "compute_ms_per_device": [
            round(r["prefill_ms"] - c["comm_ms"], 2) for r, c in zip(results, prefill)
        ],
        "work_breakdown_ms": work_breakdown(results),
        "placement_cost": results[0].get("placement_cost"),  # balanced: the fitted costs
        "exchange": (
            resolve_exchange(config.exchange, decoder)
            if method in SEQUENCE_PARALLEL_METHODS
            else None
        ),
        "codebooks": None if method != "astra" else _codebooks_label(config, artefact),
    }


def write_outputs(records: list[dict], out: Path, command: str, config: BenchConfig) -> list[Path]:
    """JSON (records + command + config), a markdown table and a latency-vs-bandwidth plot."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "bench"
    meta = {
        **provenance(),
        "command": command,
        "config": asdict(config),
        "records": records,
    }
    write_json(stem.with_suffix(".json"), meta)
    write_text(stem.with_suffix(".md"), markdown_table(records, command))
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    png = plot_latency(records, stem.with_suffix(".png"))
    if png is not None:
        paths.append(png)
    return paths


def markdown_table(records: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| method | devices | tokens | Mbit/s | latency ms | total ms | compute ms | "
        "comm ms | bytes/device | speed-up vs single | per repeat | best/best | work/1 dev |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "skipped" in r:
            lines.append(
                f"| {r['method']} | {r['devices']} | {r['tokens']} | "
                f"{r['bandwidth_mbps']:g} | - | skipped: {r['skipped']} ||||||||"
            )
            continue
        name = r["method"] + (" (changes the model)" if r["changes_model"] else "")
        if r["method"] == "astra":
            name += f" G={r['groups']} K={r['codebook_size']} {r['quant_point']}"
        speed = r["speedup_vs_single"]
        per_repeat = " / ".join(f"{x:.2f}" for x in r.get("speedup_per_repeat") or []) or "-"
        best = r.get("speedup_best")
        work = r.get("work_vs_single")
        lines.append(
            f"| {name} | {r['devices']} | {r['tokens']} | {r['bandwidth_mbps']:g} | "
            f"{r['latency_ms']:g} | {r['total_ms']:.1f} | {r['compute_ms']:.1f} | "
            f"{r['comm_ms']:.1f} | {r['bytes_per_device']:,} | "
            f"{'-' if speed is None else f'{speed:.2f}x'} | {per_repeat} | "
            f"{'-' if best is None else f'{best:.2f}x'} | "
            f"{'-' if work is None else f'{work:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot_latency(records: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "skipped" not in r]
    multi = [r for r in records if r["method"] != "single"]
    if not multi:
        return None
    tokens = max(r["tokens"] for r in records)
    device_counts = sorted({r["devices"] for r in multi})
    fig, axes = plt.subplots(
        1, len(device_counts), figsize=(5.5 * len(device_counts), 4.2), squeeze=False
    )
    for ax, n in zip(axes[0], device_counts):
        for method in dict.fromkeys(r["method"] for r in multi):
            pts = sorted(
                (r["bandwidth_mbps"], r["total_ms"])
                for r in multi
                if r["method"] == method and r["devices"] == n and r["tokens"] == tokens
            )
            if pts:
                label = method + (" (changes model)" if method == "bp" else "")
                ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=label)
        single = [r for r in records if r["method"] == "single" and r["tokens"] == tokens]
        if single:
            ax.axhline(single[0]["total_ms"] / 1e3, color="k", ls="--", label="single device")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bandwidth per device (Mbit/s)")
        ax.set_ylabel("prefill latency (s)")
        ax.set_title(f"{records[0]['model']}, {n} devices, {tokens} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _codebooks_label(config: BenchConfig, artefact: str) -> str:
    """What the record says of the codebooks timed: --artefact's, the cached calibrated ones,
    or timing-only ones (bench_codebooks names those timing-<tokens>.safetensors)."""
    if config.artefact:
        return "artefact " + str(artefact)
    name = Path(artefact).name
    return "timing-only" if name.startswith("timing-") else f"calibrated (cached: {name})"
