"""Load on `astra serve`: N closed-loop clients, one device against ASTRA on several.

For each configuration a real `astra serve` starts (real worker processes, the emulated link),
then `--clients` asyncio clients each send streamed completions back to back until
`--requests` have been sent in all. Every request continues a different held-out Austen
passage of `--prompt-tokens` tokens and asks for `--max-tokens` tokens (greedy, end-of-sequence
ignored, so every request does the same work). Measured at the client, as a user sees it:
time to first token (first streamed chunk), time per output token after it, whole-request
latency, requests per second; and the server's own `usage.astra` timings beside them. A request
counts as served only if its stream ends with [DONE] and carries exactly max_tokens tokens;
anything else is counted as lost.

    .venv/bin/python benchmarks/serve_load.py                       # one device vs ASTRA on 2
    .venv/bin/python benchmarks/serve_load.py --requests 40 --clients 4 --prompt-tokens 256

Writes benchmarks/results/serve/serve_load.json (numbers, command, git commit) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from astra.net.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def prompts(model: str, n: int, tokens: int) -> list[str]:
    """n different Austen passages of `tokens` tokens each, as text: the held-out test and
    validation parts first, then the training part (SmolLM2 was not trained on our splits)."""
    from astra.datasets import austen_text, token_blocks
    from astra.hub import resolve_model
    from astra.models import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(model))
    rows: list[list[int]] = []
    for split in ("test", "val", "train"):
        if len(rows) < n:
            rows += token_blocks(tokenizer, austen_text(split), tokens, n - len(rows)).tolist()
    return [tokenizer.decode(row) for row in rows]


class Server:
    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "astra.cli.main", "serve", "--port", str(self.port), *args]
        self.command = " ".join(["astra", "serve", *args])
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.proc.stdout:
            if "ready at" in line:
                self.ready_line = line.strip()
                return
        raise RuntimeError(f"astra serve did not start; see {log}")

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, n: int):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, done = 0, None, False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            if event.get("choices") and event["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    end = time.perf_counter()
    ok = done and usage is not None and usage["completion_tokens"] == n
    tokens = usage["completion_tokens"] if usage else 0
    return {
        "ok": ok,
        "status": 200,
        "latency_s": end - t0,
        "ttft_s": (first - t0) if first else None,
        "tpot_s": (last - first) / (tokens - 1) if first and tokens > 1 else None,
        "server": usage["astra"] if usage else None,
        "start": t0,
    }


async def load(url: str, model: str, texts: list[str], clients: int, n: int) -> tuple:
    queue: asyncio.Queue = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    results: list[dict] = []
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def worker():
            while not queue.empty():
                text = queue.get_nowait()
                results.append(await one_request(client, url, model, text, n))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(name: str, results: list[dict], wall: float) -> dict:
    served = [r for r in results if r["ok"]]
    ms = lambda key, q: (  # noqa: E731
        None
        if percentile([r[key] for r in served], q) is None
        else round(percentile([r[key] for r in served], q) * 1e3, 1)
    )
    server = [r["server"] for r in served]
    return {
        "config": name,
        "requests": len(results),
        "served": len(served),
        "lost": len(results) - len(served),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(served) / wall, 3),
        "ttft_ms_p50": ms("ttft_s", 0.5),
        "ttft_ms_p95": ms("ttft_s", 0.95),
        "tpot_ms_p50": ms("tpot_s", 0.5),
        "tpot_ms_p95": ms("tpot_s", 0.95),
        "latency_ms_p50": ms("latency_s", 0.5),
        "latency_ms_p95": ms("latency_s", 0.95),
        "server_prefill_ms_p50": round(statistics.median(s["ttft_ms"] for s in server), 1),
        "server_queue_ms_p50": round(statistics.median(s["queue_ms"] for s in server), 1),
        "server_tpot_ms_p50": round(statistics.median(s["tpot_ms"] for s in server), 1),
        "methods": sorted({s["method"] for s in server}),
        "bytes_sent_per_request": max(max(s["bytes_sent_per_device"]) for s in server),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--requests", type=int, default=120, help="requests per configuration")
    p.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--bandwidth", default="10mbit")
    p.add_argument("--latency", default="20ms")
    p.add_argument("--out", default="benchmarks/results/serve/serve_load.json")
    args = p.parse_args()

    texts = prompts(args.model, args.requests, args.prompt_tokens)
    link = ["--bandwidth", args.bandwidth, "--latency", args.latency]
    common = ["--model", args.model, "--max-queue", str(args.clients + 1), *link]
    configs = {
        "single (1 device)": [*common, "--devices", "1", "--method", "single"],
        f"astra ({args.devices} devices)": [*common, "--devices", str(args.devices)],
    }
    rows, commands = [], {}
    logs = Path(tempfile.mkdtemp(prefix="astra-serve-load-"))
    for name, server_args in configs.items():
        print(f"== {name}: starting astra serve", flush=True)
        server = Server(server_args, logs / f"{len(rows)}.log")
        commands[name] = server.command
        try:
            asyncio.run(load(server.url, args.model, texts[:2], 1, args.max_tokens))  # warm
            results, wall = asyncio.run(
                load(server.url, args.model, texts, args.clients, args.max_tokens)
            )
        finally:
            server.stop()
        rows.append(summarize(name, results, wall))
        print(json.dumps(rows[-1]), flush=True)

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    out = {
        "command": " ".join([".venv/bin/python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "settings": vars(args),
        "servers": commands,
        "results": rows,
    }
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}\n")
    print(
        "| config | served / sent | req/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | "
        "latency p50 / p95 ms | server prefill p50 ms | queue p50 ms | bytes sent / request |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['served']} / {r['requests']} | {r['requests_per_s']} | "
            f"{r['ttft_ms_p50']} / {r['ttft_ms_p95']} | {r['tpot_ms_p50']} / {r['tpot_ms_p95']} | "
            f"{r['latency_ms_p50']} / {r['latency_ms_p95']} | {r['server_prefill_ms_p50']} | "
            f"{r['server_queue_ms_p50']} | {r['bytes_sent_per_request']} |"
        )
    return 0 if all(r["lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
