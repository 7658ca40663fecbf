"""Pieces every `astra` subcommand shares: link flags, error reporting, JSON output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from astra import storage
from astra.group.config import DTYPES, SEARCHES
from astra.models.quantize import WEIGHTS
from astra.net.link import parse_bandwidth, parse_latency
from astra.parallel.runtime import EXCHANGES


def bandwidth_arg(text: str) -> float:
    try:
        return parse_bandwidth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def latency_arg(text: str) -> float:
    try:
        return parse_latency(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers like 1,2,4, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1 like 1,2,4, got {text!r}")
    return values


def add_link_args(parser: argparse.ArgumentParser, bandwidth="10mbit", latency="20ms") -> None:
    parser.add_argument(
        "--bandwidth",
        type=bandwidth_arg,
        default=parse_bandwidth(bandwidth),
        metavar="RATE",
        help=f"each device's uplink, e.g. 10mbit, 100mbit, 1gbit, inf (default {bandwidth}); "
        "every message pays latency + bytes*8/bandwidth on top of the real transport",
    )
    parser.add_argument(
        "--latency",
        type=latency_arg,
        default=parse_latency(latency),
        metavar="TIME",
        help=f"one-way latency per message, e.g. 20ms, 0.5s, 0 (default {latency})",
    )


def add_model_arg(parser: argparse.ArgumentParser, default: str | None = "smollm2-135m") -> None:
    parser.add_argument(
        "--model",
        default=default,
        required=default is None,
        help="prepared model name (see `astra models list`) or a local HF-format directory"
        + (f" (default {default})" if default else ""),
    )


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    """ASTRA's codebooks: G, K, the quantization point and an artefact (run, serve)."""
    parser.add_argument(
        "--groups",
        type=positive_int,
        default=1,
        help="VQ groups G per token (default 1: 10 bits per codebook per token)",
    )
    parser.add_argument(
        "--codebook-size", type=positive_int, default=1024, help="codes per group K (default 1024)"
    )
    parser.add_argument(
        "--point",
        choices=["hidden", "kv"],
        default=None,
        help="quantization point (default: kv for Llama, hidden otherwise)",
    )
    parser.add_argument(
        "--artefact",
        default=None,
        help="codebooks from `astra calibrate`/`astra finetune`; default: calibrate "
        "once (training-free) and cache",
    )


def seconds_arg(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 30 or 2.5, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(
            f"expected a positive, finite number of seconds, got {text}"
        )
    return value


def loss_rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction like 0.05, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a packet loss rate in [0, 1), got {text}")
    return value


def parity_arg(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (no parity) or more, got {value}")
    return value


def loss_rates_arg(text: str) -> list[float]:
    """ "0,0.01,0.05" -> [0.0, 0.01, 0.05]."""
    return [loss_rate_arg(t) for t in text.split(",") if t.strip()] or [0.0]


def add_loss_args(parser: argparse.ArgumentParser, many: bool = False) -> None:
    parser.add_argument(
        "--loss",
        type=loss_rates_arg if many else loss_rate_arg,
        default=[0.0] if many else 0.0,
        metavar="RATES" if many else "RATE",
        help=("packet loss rates, comma-separated, one row each, e.g. 0,0.01,0.05,0.1 "
              "(default 0)" if many else "packet loss rate, e.g. 0.05 (default 0)")
        + ": codes travel in packets of at most one MTU, never retransmitted; receivers "
        "attend to the tokens that arrived (astra.net.packets)",
    )  # fmt: skip
    parser.add_argument(
        "--parity",
        type=parity_arg,
        default=1,
        metavar="K",
        help="with --loss: one XOR parity packet per K data packets rebuilds any one lost "
        "packet of those K+1 (default 1: every packet twice, for a few hundred bytes per "
        "block; 0: no parity)",
    )


def speeds_arg(text: str) -> tuple[float, ...]:
    """ "1,0.5" -> (1.0, 0.5); the values are checked by the configs (count, > 0, finite)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 1,0.5, got {text!r}"
        ) from None


def add_device_speeds_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device-speeds",
        type=speeds_arg,
        default=None,
        metavar="S1,S2,...",
        help="heterogeneous devices (paper App. D): each device's speed relative to one core "
        "of this machine, one per device, e.g. 1,0.5 (device 1 half as fast). Emulated in the "
        "composed mode only: every compute segment a device runs is measured on this core and "
        "charged measured/speed (auto picks composed; --mode processes is refused, since fewer "
        "threads than one cannot slow a process down and sleeping would idle the core where a "
        "slow device computes). Under torchrun the real devices are as fast as they are and "
        "the speeds only size the placement. The placement uses them: contiguous gives tokens "
        "in proportion to speed, balanced sizes chunks for equal fitted cost / speed, random "
        "draws in proportion, zigzag refuses them. The one-device reference runs at speed 1",
    )


def add_timeout_args(parser: argparse.ArgumentParser, job: float = 600.0) -> None:
    parser.add_argument(
        "--timeout",
        type=seconds_arg,
        default=job,
        metavar="SECONDS",
        help=f"the whole job (or one request) fails after this long (default {job:g})",
    )
    parser.add_argument(
        "--peer-timeout",
        type=seconds_arg,
        default=30.0,
        metavar="SECONDS",
        help="a device that stops answering (frozen, partitioned, dead) is named and the job "
        "ends after this long, instead of waiting for --timeout (default 30)",
    )


def add_exchange_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exchange",
        choices=EXCHANGES,
        default="auto",
        help="how codes travel: auto (default: causal prefills stream point-to-point to the "
        "devices holding later tokens, so latency is paid once per device boundary instead of "
        "once per block; encoders all-gather), all-gather (every device waits for every other, "
        "every block: the paper's runtime), stream",
    )


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="precision every device computes in, for every method (default float32, the "
        "paper's; bfloat16 runs about 3x faster on CPUs with AMX or AVX-512 BF16 and on GPUs). "
        "Codebooks and their EMA stay float32; the code search follows --search",
    )


def note_dtype(dtype: str) -> None:
    """One line on stderr, before any work, when `--dtype` will be slower than the default:
    bfloat16 on a CPU without native bf16 dot products (no AVX-512 BF16, no AMX) is emulated
    by widening to fp32. On an AVX2 EPYC transformers' SmolLM2 prefill took 4.6x as long in
    bf16 as in fp32 (benchmarks/peers-zen1.md); users choose bf16 for speed, so say so."""
    import torch

    from astra.parallel.passes import native_bf16

    if dtype != "bfloat16" or native_bf16() or torch.cuda.is_available():
        return
    level = torch.backends.cpu.get_cpu_capability()
    print(
        f"astra: note: this CPU ({level}) has no native bf16 (AVX-512 BF16 or AMX), so "
        "--dtype bfloat16 is emulated and slower than float32 here; leave out --dtype for "
        "float32",
        file=sys.stderr,
        flush=True,
    )


def add_weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        choices=tuple(WEIGHTS),
        default="full",
        help="how each device stores its blocks' weights: full (default, as --dtype), int8 "
        "(per output channel) or int4 (per 64 inputs), weight-only on torch's CPU kernels: "
        "2.4x / 3.1x less memory for SmolLM2, faster decoding, +0.3%% / +29%% perplexity "
        "(benchmarks/results/weight_quant.json). Orthogonal to ASTRA's codes (paper Table 5)",
    )


def add_search_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--search",
        choices=SEARCHES,
        default="auto",
        help="ASTRA senders' nearest-code search: auto (default: bfloat16 on CPUs with native "
        "bf16 dot products, AVX-512 BF16 or AMX; elsewhere pca), float32 (exact), bfloat16 (a "
        "bf16 first pass, its two best candidates re-ranked exactly in fp32: within 0.05%% "
        "perplexity of the exact search on SmolLM2), pca (a first pass in a third of the "
        "dimensions, its four best re-ranked exactly: 1.3-1.5x faster than float32 on AVX2, "
        "the exact code on 99.4%% of rows). The record's `search` says which ran",
    )


def write_json(path: str | Path | None, obj) -> None:
    """Atomically (astra.storage), with where the numbers came from; nothing for no path."""
    if path is not None:
        from astra.provenance import provenance

        if isinstance(obj, dict):
            obj = {"provenance": provenance(), **obj}
        storage.write_json(path, obj)


def check_outputs(args: argparse.Namespace) -> None:
    """Every path a command will write can be written, checked before any work starts, so a
    bad path costs one line (exit 2), not a finished run. A file-valued --out is refused when it
    exists unless --force; --json is a report and is overwritten."""
    storage.check_output(getattr(args, "json", None), force=True, flag="--json")
    storage.check_output(getattr(args, "checkpoint", None), force=True, flag="--checkpoint")
    out = getattr(args, "out", None)
    if getattr(args, "out_is_dir", False):
        storage.check_output_dir(out)
    else:
        storage.check_output(out, force=getattr(args, "force", False))


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="overwrite --out if it exists (default: refuse)"
    )


def fail(message: str) -> int:
    print(f"astra: error: {message}", file=sys.stderr)
    return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, reported as one line instead of a traceback."""
    from astra.datasets import DataNotFoundError
    from astra.group.group import GroupError
    from astra.hub import HubError
    from astra.net.auth import AuthenticationError
    from astra.net.comm import PeerFailure
    from astra.net.launch import WorkerFailure
    from astra.parallel.artefact import ArtefactMismatchError

    return (
        ValueError,
        FileNotFoundError,
        HubError,
        DataNotFoundError,
        ArtefactMismatchError,
        PeerFailure,
        WorkerFailure,
        AuthenticationError,
        GroupError,
        NotImplementedError,
    )
