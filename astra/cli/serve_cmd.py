"""`astra serve`: start a device group once and serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import socket
import sys

from astra.cli.common import (
    add_dtype_arg,
    add_exchange_arg,
    add_link_args,
    add_loss_args,
    add_model_arg,
    add_quant_args,
    add_search_arg,
    add_weights_arg,
    fail,
    note_dtype,
    positive_int,
    seconds_arg,
    user_errors,
)
from astra.group.config import FALLBACKS
from astra.methods import GENERATING_METHODS
from astra.parallel.placement import PLACEMENTS
from astra.parallel.runtime import REMOTE_CACHES

EPILOG = """\
examples:
  astra serve                                    # SmolLM2-135M on 2 devices, http://127.0.0.1:8000/v1
  astra serve --devices 2 --bandwidth 100mbit --latency 5ms --fallback auto
  astra serve --loss 0.05                        # 5 % of code packets lost, never resent
  astra serve --model minilm-l6 --port 8001      # /v1/embeddings
  astra serve --model dinov2-s --port 8002       # /v1/images/features
  astra serve --host 0.0.0.0 --api-key "$(cat ~/.astra-key)"   # reachable from the network

then, from any OpenAI client:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true for
server-sent events), POST /v1/embeddings (text encoders), POST /v1/images/features (ViTs:
{"model", "image": base64 PNG/JPEG} -> features), GET /health, GET /metrics (Prometheus).
One sequence at a time goes through the group (all devices work on it together); the others
wait in a queue of --max-queue places, and a full queue answers 503 with Retry-After.
"""


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model on N devices behind an OpenAI-compatible HTTP API",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arg(p)
    p.add_argument(
        "--served-model-name",
        default=None,
        help='the name clients send as "model" (default: --model as given)',
    )
    p.add_argument("--devices", type=positive_int, default=2, help="worker devices (default 2)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
        "the network, so set --api-key too)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("ASTRA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $ASTRA_API_KEY, else none)",
    )
    p.add_argument(
        "--method",
        choices=GENERATING_METHODS,
        default="astra",
        help="how the devices share each request (default astra; single = one device)",
    )
    p.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default="off",
        help="auto: run a request on one device when that is predicted faster on this link "
        "(short prompts, fast links); usage.astra says when it happened (default off)",
    )
    add_link_args(p)
    add_loss_args(p)
    add_quant_args(p)
    add_dtype_arg(p)
    add_weights_arg(p)
    add_search_arg(p)
    p.add_argument("--placement", choices=PLACEMENTS, default="contiguous", help="see astra run")
    add_exchange_arg(p)
    p.add_argument(
        "--remote-cache",
        choices=REMOTE_CACHES,
        default="rebuilt",
        help="decoding rebuilds the other devices' K/V once (default, fastest per token) or "
        "keeps them as codes, rebuilt every step (App. G, less memory)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait behind the running one before 503 (default 16)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=16,
        help="completion length when a request names none (default 16, as OpenAI's)",
    )
    p.add_argument(
        "--peer-timeout",
        type=seconds_arg,
        default=30.0,
        help="seconds a device may stay silent before it is named and the group re-forms "
        "without it (default 30)",
    )
    p.add_argument(
        "--request-timeout",
        type=seconds_arg,
        default=600.0,
        help="seconds one request may run, prefill to last token (default 600)",
    )
    p.add_argument(
        "--start-timeout",
        type=seconds_arg,
        default=600.0,
        help="seconds for the devices to load and warm up (default 600)",
    )
    p.set_defaults(runner=run)
    return p


def run(args) -> int:
    import uvicorn

    from astra.group import Group, GroupConfig, LinkConfig, QuantConfig
    from astra.serve.app import ServeConfig, create_app

    if not 0 < args.port < 65536:
        return fail(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        return fail(f"--max-queue must be >= 0, got {args.max_queue}")
    problem = _port_problem(args.host, args.port)
    if problem:
        return fail(problem)
    try:
        note_dtype(args.dtype)
        methods = ("single", args.method) if args.method != "single" else ("single",)
        config = GroupConfig(
            model=args.model,
            devices=args.devices,
            method=args.method,
            methods=methods,
            link=LinkConfig(
                bandwidth_mbps=args.bandwidth,
                latency_ms=args.latency,
                loss_rate=args.loss,
                loss_parity=args.parity,
            ),
            quant=QuantConfig(
                groups=args.groups,
                codebook_size=args.codebook_size,
                point=args.point,
                artefact=args.artefact,
                search=args.search,
            ),
            dtype=args.dtype,
            weights=args.weights,
            placement=args.placement,
            exchange=args.exchange,
            remote_cache=args.remote_cache,
            fallback=args.fallback,
            peer_timeout_s=args.peer_timeout,
            request_timeout_s=args.request_timeout,
            start_timeout_s=args.start_timeout,
        )
        serve_config = ServeConfig(
            served_model_name=args.served_model_name or args.model,
            max_queue=args.max_queue,
            default_max_tokens=args.max_tokens,
            api_key=args.api_key or None,
        )
        print(f"astra serve: starting {args.devices} device(s) with {args.model}...", flush=True)
        group = Group(config, progress=True).start()
    except user_errors() as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print("astra serve: interrupted", file=sys.stderr)
        return 130
    # uvicorn stops gracefully on SIGTERM, then re-raises it under the handler it found: make
    # that handler an exception, so the devices are shut down below instead of orphaned
    signal.signal(signal.SIGTERM, _terminated)
    try:
        app = create_app(group, serve_config)
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
        )
        asyncio.run(_serve(server, _ready_line(args, group, serve_config)))
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 143
    finally:
        group.close()
    return 0


class _Terminated(Exception):
    """SIGTERM arrived (a service manager stopping the server)."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


async def _serve(server, ready_line: str) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(ready_line, flush=True)
    await task


def _ready_line(args, group, serve_config) -> str:
    host = f"[{args.host}]" if ":" in args.host else args.host
    link = group.config.link
    bw = "unlimited" if link.bandwidth_mbps == float("inf") else f"{link.bandwidth_mbps:g} Mbit/s"
    method = group.method_for(group.config.method)
    if method == "astra":
        q = group.quant_info
        method += f" (G={q['groups']}, K={q['codebook_size']}, {q['quant_point']} point)"
    open_note = "" if _is_loopback(args.host) else " -- listening beyond this machine"
    auth = ", API key required" if serve_config.api_key else ""
    loss = ""
    if link.loss_rate > 0 and not method.startswith("single"):  # lost codes are not resent
        parity = f"parity 1 per {link.loss_parity}" if link.loss_parity else "no parity"
        loss = f", {link.loss_rate * 100:g}% packet loss ({parity})"
    return (
        f"astra serve: ready at http://{host}:{args.port}/v1 | model "
        f"{serve_config.served_model_name} ({group.kind}) | {group.devices} device(s) | "
        f"link {bw}, {link.latency_ms:g} ms{loss} | "
        f"method {method}{auth}{open_note}"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_problem(host: str, port: int) -> str | None:
    """Checked before the devices start: a taken port or an unknown address, in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"--host {host!r} is not an address of this machine ({exc.strerror})"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            return (
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or "
                "stop the program using it"
            )
    return None
