"""`astra bench`: sweep devices x bandwidth x tokens x method; JSON, markdown and a plot."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from astra.bench import BENCH_METHODS, BenchConfig, run_bench, write_outputs
from astra.cli.common import (
    add_device_speeds_arg,
    add_dtype_arg,
    add_exchange_arg,
    add_model_arg,
    add_search_arg,
    add_timeout_args,
    bandwidth_arg,
    fail,
    int_list,
    latency_arg,
    note_dtype,
    positive_int,
    user_errors,
)
from astra.parallel.placement import PLACEMENTS

EPILOG = """\
examples:
  astra bench                                  # SmolLM2, 2 and 4 devices, 10/100/1000 Mbit/s
  astra bench --model dinov2-s --tokens 1025 --devices 2,4 --bandwidths 10mbit,100mbit
  astra bench --mode processes --devices 2     # real processes (one core per device)
  astra bench --devices 2 --bandwidths 10mbit --methods single,astra --repeats 5
  astra bench --devices 2 --device-speeds 1,0.5 --placement balanced --methods single,astra

modes: `composed` runs every device's compute for real, one device at a time on one core
(timed as CPU time), and composes the critical path with the link model: deterministic and
usable for more devices than cores. `processes` runs one real process per device over gloo
with the link emulated on top of the real transport (needs a core per device).
bp (block parallelism) changes the model: its rows are latency only.
"""


def add_bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="benchmark every strategy side by side on emulated links",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument(
        "--devices",
        type=int_list,
        default=None,
        help="comma-separated device counts (default 2,4; with --trace one count, default 4)",
    )
    p.add_argument(
        "--bandwidths",
        default=None,
        help="comma-separated per-device uplink rates (default 10mbit,100mbit,1gbit; with "
        "--trace the trace's own rates are used)",
    )
    p.add_argument(
        "--latency",
        type=latency_arg,
        default=20.0,
        metavar="TIME",
        help="one-way latency per message (default 20ms)",
    )
    p.add_argument(
        "--tokens",
        type=int_list,
        default=[512],
        help="comma-separated sequence lengths (ViT: (side/14)^2+1, e.g. 1025)",
    )
    p.add_argument(
        "--methods",
        default=",".join(BENCH_METHODS),
        help=f"comma-separated subset of {','.join(BENCH_METHODS)}",
    )
    p.add_argument("--groups", type=positive_int, default=1, help="ASTRA VQ groups G (default 1)")
    p.add_argument(
        "--codebook-size",
        type=positive_int,
        default=1024,
        help="ASTRA codes per group K (default 1024)",
    )
    p.add_argument(
        "--point",
        choices=["hidden", "kv"],
        default=None,
        help="ASTRA quantization point (default kv for Llama, hidden otherwise)",
    )
    p.add_argument(
        "--artefact",
        default=None,
        help="codebooks to time with (default: the calibrated ones `astra run` cached for "
        "these settings, else timing-only codebooks drawn from the timed input; encoders' "
        "(and GPT-2's) timings depend on the codes: they attend to each distinct remote code "
        "once)",
    )
    p.add_argument(
        "--mode",
        choices=["composed", "processes"],
        default="composed",
        help="composed (default) or processes; see below",
    )
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="contiguous",
        help="token-to-device assignment for SP methods (see astra run --help)",
    )
    p.add_argument(
        "--pp-chunks", type=positive_int, default=4, help="pipeline chunks for decoders (default 4)"
    )
    p.add_argument(
        "--bp-syncs",
        type=positive_int,
        default=1,
        help="block parallelism synchronisations Nb (default 1)",
    )
    p.add_argument(
        "--tables",
        action="store_true",
        help="ASTRA hidden point: rebuild remote K/V with per-code projection tables",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="ASTRA/SP wait for remote data before any attention",
    )
    add_exchange_arg(p)
    add_device_speeds_arg(p)
    add_dtype_arg(p)
    add_search_arg(p)
    add_timeout_args(p, job=900.0)
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="run every entry this many times, interleaved (all methods, then all again); "
        "records keep the median pass and each repeat's side-by-side speed-up (default 1)",
    )
    trace = p.add_argument_group(
        "dynamic bandwidth (the paper's Fig. 11)",
        "--trace replays a bandwidth trace under a closed-loop client and counts the requests "
        "each method serves: every method is measured at the trace's rates and fitted as "
        "compute + bytes/bandwidth (astra/trace.py says how)",
    )
    trace.add_argument(
        "--trace",
        default=None,
        metavar="markov|FILE.csv",
        help="markov: the paper's synthetic chain between 20 and 100 Mbit/s (seeded); or a CSV "
        "of time,mbps rows",
    )
    trace.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="seconds of trace to replay (default 120; the paper: 600)",
    )
    trace.add_argument("--trace-seed", type=int, default=0, help="markov trace seed (default 0)")
    trace.add_argument(
        "--trace-states",
        default="20mbit,40mbit,60mbit,80mbit,100mbit",
        metavar="RATES",
        help="markov: the chain's rates (default the paper's 20,40,60,80,100 Mbit/s)",
    )
    trace.add_argument(
        "--groups-set",
        type=int_list,
        default=None,
        help="ASTRA runs once per G, e.g. 1,16,32 (default: --groups)",
    )
    trace.add_argument(
        "--adaptive",
        action="store_true",
        help="also pick G per request: the richest G whose transfer fits the bandwidth the "
        "previous request saw (its time there within --tolerance of its best), never below "
        "--min-groups",
    )
    trace.add_argument(
        "--min-groups",
        type=positive_int,
        default=1,
        help="adaptive: the quality floor, never fewer groups than this (default 1)",
    )
    trace.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="adaptive: a G's transfer fits while its predicted time is within this fraction "
        "of its time on the fastest measured link (default 0.10)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where bench.json, bench.md and bench.png go (default: a new folder under "
        "$ASTRA_HOME/bench, printed at the end)",
    )
    p.set_defaults(runner=run, out_is_dir=True)
    return p


def run(args) -> int:
    if args.trace is not None:
        return run_trace(args)
    try:
        bandwidths = tuple(
            bandwidth_arg(b)
            for b in (args.bandwidths or "10mbit,100mbit,1gbit").split(",")
            if b.strip()
        )
        config = bench_config(args, bandwidths, tuple(args.devices or [2, 4]))
        note_dtype(args.dtype)
        records = run_bench(config)
    except (argparse.ArgumentTypeError, *user_errors()) as exc:
        return fail(str(exc))
    command = "astra " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_outputs(records, _out_dir(args, "bench"), command, config)
    print(Path(paths[1]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    failed = sorted({f"{r['method']} x{r['devices']}: {r['skipped']}" for r in records
                     if "skipped" in r})  # fmt: skip
    if failed:
        print(f"astra: error: {len(failed)} runs failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _out_dir(args, kind: str) -> Path:
    """--out, or a new time-stamped folder in the cache (never the current directory)."""
    if args.out is not None:
        return Path(args.out)
    from astra.hub import cache_dir

    return cache_dir() / kind / time.strftime("%Y%m%d-%H%M%S")


def run_trace(args) -> int:
    from astra.trace import markov_trace, read_trace_csv
    from astra.trace_bench import TraceBenchConfig, run_trace_bench, write_trace_outputs

    try:
        if args.bandwidths is not None:
            raise ValueError("--bandwidths does nothing with --trace: the trace sets the rates")
        if not args.duration > 0 or args.duration == float("inf"):
            raise ValueError(
                f"--duration must be a positive number of seconds, got {args.duration}"
            )
        if args.trace == "markov":
            states = tuple(bandwidth_arg(r) for r in args.trace_states.split(",") if r.strip())
            trace = markov_trace(args.duration, states=states, seed=args.trace_seed)
        else:
            trace = read_trace_csv(args.trace, args.duration)
        devices = tuple(args.devices or [4])
        bench = bench_config(args, (1.0,), devices)
        config = TraceBenchConfig(
            bench=bench,
            groups_set=tuple(args.groups_set or [args.groups]),
            adaptive=args.adaptive,
            min_groups=args.min_groups,
            tolerance=args.tolerance,
        )
        result = run_trace_bench(config, trace)
    except (argparse.ArgumentTypeError, *user_errors()) as exc:
        return fail(str(exc))
    command = "astra " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_trace_outputs(result, _out_dir(args, "trace"), command)
    print(Path(paths[1]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def bench_config(args, bandwidths: tuple[float, ...], devices: tuple[int, ...]) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        devices=devices,
        bandwidths_mbps=bandwidths,
        latency_ms=args.latency,
        tokens=tuple(args.tokens),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        groups=args.groups,
        codebook_size=args.codebook_size,
        quant_point=args.point,
        artefact=args.artefact,
        mode=args.mode,
        placement=args.placement,
        pp_chunks=args.pp_chunks,
        bp_syncs=args.bp_syncs,
        overlap=not args.no_overlap,
        exchange=args.exchange,
        use_tables=args.tables,
        repeats=args.repeats,
        dtype=args.dtype,
        search=args.search,
        timeout_s=args.timeout,
        peer_timeout_s=args.peer_timeout,
        device_speeds=args.device_speeds,
    )
