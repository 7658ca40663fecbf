"""`astra run`: the main job (distributed inference on N devices, measured side by side)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from astra.cli.common import (
    add_device_speeds_arg,
    add_dtype_arg,
    add_exchange_arg,
    add_link_args,
    add_loss_args,
    add_model_arg,
    add_quant_args,
    add_search_arg,
    add_timeout_args,
    add_weights_arg,
    fail,
    note_dtype,
    positive_int,
    user_errors,
    write_json,
)
from astra.parallel.placement import PLACEMENTS
from astra.parallel.runtime import REMOTE_CACHES
from astra.runner import METHODS, MODES, RunConfig, run_inference, run_torchrun, under_torchrun

EPILOG = """\
examples:
  astra run                                   # SmolLM2-135M, 2 devices, 10 Mbit/s, 20 ms
  astra run --devices 4 --bandwidth 100mbit   # 4 devices (composed mode on a 2-core machine)
  astra run --model dinov2-s --tokens 1025    # a ViT: 448 px photo, 1024 patches + CLS
  astra run --methods single,astra,sp-fp32,sp-fp16 --json run.json
  astra run --artefact ~/.cache/astra/artefacts/my-finetuned.safetensors
  astra run --devices 4 --dtype bfloat16      # every method in bf16 (AMX / AVX-512 BF16 CPUs)
  astra run --weights int8                    # 8-bit weights: smaller, faster decoding
  astra run --device-speeds 1,0.5 --placement balanced   # device 1 half as fast (composed)

Every method runs on the same input and the same emulated link in this one command, so the
speed-ups it prints are measured side by side.

Over several machines, start one rank per machine with torchrun; each rank runs ASTRA on its
share of the tokens over the real network (add --bandwidth inf --latency 0 to emulate nothing):
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \
      -m astra.cli.main run --bandwidth inf --latency 0
"""


def add_run_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run",
        help="the main job: ASTRA inference on N devices vs one device and full-precision SP",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument(
        "--devices",
        type=positive_int,
        default=2,
        help="number of devices sharing the sequence (default 2)",
    )
    add_link_args(p)
    p.add_argument(
        "--tokens",
        type=positive_int,
        default=1024,
        help="prompt length in tokens for text models (default 1024)",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=448,
        help="ViT input side in pixels; 448 px / patch 14 = 1024 patches + CLS",
    )
    p.add_argument(
        "--new-tokens",
        type=positive_int,
        default=16,
        help="tokens to generate after the prefill (decoders; default 16)",
    )
    p.add_argument(
        "--prompt", default=None, help="text to continue (decoders); default: held-out Austen text"
    )
    add_quant_args(p)
    p.add_argument(
        "--methods",
        default="single,astra,sp-fp32",
        help=f"comma-separated subset of {','.join(METHODS)} (default single,astra,sp-fp32)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="processes: one real process per device; composed: per-device compute "
        "measured one at a time and composed with the link model (for more devices "
        "than cores); auto picks by core count",
    )
    p.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="contiguous",
        help="which tokens each device holds: contiguous equal chunks (default; in proportion "
        "to --device-speeds when given); balanced (contiguous chunks sized for equal work, or "
        "equal work / speed, from costs fitted on one measured pass: later devices attend to "
        "more keys, earlier ones also encode; decoders only); "
        "zigzag (chunks d and 2N-1-d: balances causal attention but every device then "
        "needs every other's codes, "
        "so no streaming benefit); random",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="wait for remote codes before any attention (the paper's serial runtime)",
    )
    add_exchange_arg(p)
    add_device_speeds_arg(p)
    p.add_argument(
        "--tables",
        action="store_true",
        help="rebuild remote K/V with per-code projection tables (hidden point)",
    )
    p.add_argument(
        "--remote-cache",
        choices=REMOTE_CACHES,
        default="rebuilt",
        help="decoding: rebuild the other devices' keys/values once and keep the floats "
        "(default: a decoding step then costs what it costs on one device), or keep them as "
        "codes and rebuild them every step (the paper's App. G: ~600x less memory for the "
        "remote part, slower per token)",
    )
    add_loss_args(p)
    add_timeout_args(p)
    add_dtype_arg(p)
    add_weights_arg(p)
    add_search_arg(p)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(runner=run)
    return p


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        config = RunConfig(
            model=args.model,
            devices=args.devices,
            bandwidth_mbps=args.bandwidth,
            latency_ms=args.latency,
            tokens=args.tokens,
            image_size=args.image_size,
            new_tokens=args.new_tokens,
            groups=args.groups,
            codebook_size=args.codebook_size,
            quant_point=args.point,
            artefact=args.artefact,
            methods=methods,
            mode=args.mode,
            placement=args.placement,
            overlap=not args.no_overlap,
            exchange=args.exchange,
            remote_cache=args.remote_cache,
            use_tables=args.tables,
            timeout_s=args.timeout,
            peer_timeout_s=args.peer_timeout,
            prompt=args.prompt,
            loss_rate=args.loss,
            parity=args.parity,
            dtype=args.dtype,
            weights=args.weights,
            search=args.search,
            device_speeds=args.device_speeds,
        )
        if os.environ.get("RANK", "0") == "0":  # logs from rank 0 only (torchrun)
            note_dtype(args.dtype)
        if under_torchrun():  # one rank of a multi-machine job: ASTRA only, rank 0 reports
            summary = run_torchrun(config)
            if summary is None:
                _leave_torchrun_rank(0)
        else:
            summary = run_inference(config, log=lambda m: print(m, flush=True))
    except user_errors() as exc:
        return fail(str(exc))
    print_summary(summary)
    write_json(args.json, summary)
    if under_torchrun():
        _leave_torchrun_rank(0)
    return 0


def _leave_torchrun_rank(code: int) -> None:
    """End a torchrun rank now that its work is written: at interpreter exit, gloo's threads
    can still be joinable when their peer is gone, and C++ then aborts the process (SIGABRT,
    about 1 run in 10 here), which torchrun reports as a failed job."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print_summary(summary: dict) -> None:
    cfg = summary["config"]
    bw = cfg["bandwidth_mbps"]
    print()
    print(f"model   {summary['model']}  ({summary['model_dir']})")
    print(f"input   {summary['input']}")
    print(f"link    {bw:g} Mbit/s per device, {cfg['latency_ms']:g} ms one-way")
    print(f"dtype   {cfg.get('dtype', 'float32')} compute on every device")
    if cfg.get("weights", "full") != "full":
        print(f"weights {cfg['weights']} (weight-only, the blocks' linear layers)")
    if cfg.get("device_speeds"):
        speeds = ",".join(f"{s:g}" for s in cfg["device_speeds"])
        print(f"speeds  {speeds} (each device charged its measured compute / speed; "
              f"placement {cfg['placement']})")  # fmt: skip
    if summary.get("artefact"):
        print(f"codes   {summary['artefact']}")
    if "prompt_tail" in summary:
        print(f"\nprompt ends: ...{json.dumps(summary['prompt_tail'])}")
        for r in summary["records"]:
            if "completion" in r:
                print(f"completion ({r['method']:>7}): {json.dumps(r['completion'])}")
    print()
    head = (
        f"{'method':<8} {'dev':>3} {'mode':<9} {'TTFT ms':>9} {'TPOT ms':>8} "
        f"{'compute ms':>11} {'comm ms':>9} {'wait ms':>9} {'sent/dev':>10} {'speed-up':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in summary["records"]:
        tpot = f"{r['tpot_ms']:.1f}" if r.get("tpot_ms") is not None else "-"
        print(
            f"{r['method']:<8} {r['devices']:>3} {r['mode']:<9} {r['ttft_ms']:>9.1f} {tpot:>8} "
            f"{max(r['compute_ms_per_device']):>11.1f} {max(r['comm_ms_per_device']):>9.1f} "
            f"{max(r['wait_ms_per_device']):>9.1f} {_bytes(max(r['bytes_sent_per_device'])):>10} "
            f"{_speedup(r.get('speedup_vs_single')):>8}"
        )
    for r in summary["records"]:
        if "cosine_to_single" in r and r["method"] != "single":
            print(
                f"output ({r['method']}): cosine similarity to the single device's "
                f"{r['cosine_to_single']:.4f}"
            )
    astra = next((r for r in summary["records"] if r["method"] == "astra"), None)
    if astra is not None:
        parts = []
        if "speedup_vs_single" in astra:
            parts.append(f"{astra['speedup_vs_single']:.2f}x the speed of one device")
        if "speedup_vs_sp_fp32" in astra:
            parts.append(f"{astra['speedup_vs_sp_fp32']:.1f}x that of full-precision SP")
        if parts:
            print(f"\nASTRA prefill: {' and '.join(parts)} (measured in this run).")
        lost = sum(astra.get("lost_remote_tokens_per_device", []))
        if lost:
            print(f"lost codes: {lost} remote token-blocks dropped (--loss), not retransmitted")
        if astra.get("kv_cache"):
            c = astra["kv_cache"]
            remote = (
                f"{_bytes(c['remote_rebuilt_bytes'])} remote rebuilt once"
                " (--remote-cache codes keeps codes)"
                if c.get("remote_rebuilt_bytes")
                else f"{_bytes(c['remote_code_bytes'])} remote kept as codes"
            )
            print(f"decode-device KV cache: {_bytes(c['local_exact_bytes'])} exact local, {remote}")
    print("TTFT = prefill to first token; compute/comm/wait: slowest device, prefill phase.")


def _speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
