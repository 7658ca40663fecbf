"""Issue 12's goal head to head: the best one-thread engine and ASTRA, alternated round by round.

    bash benchmarks/peers.sh                                  # once: builds .venv-peers and inputs
    .venv/bin/python benchmarks/peers/head_to_head.py --rounds 4 \\
        --results benchmarks/results/peers-zen1 \\
        --md benchmarks/results/peers-zen1/head_to_head-contiguous.md

`peers.sh` runs each engine's repeats one engine after the other, over about 20 minutes; the
machines here drift by 10-15 % over such a stretch, which is the size of the goal's margins.
Here every round runs, back to back: the engine's pass (llama.cpp F32 with flash attention for
SmolLM2, onnxruntime for DINOv2-S; one warm-up then one timed pass, in a fresh process), and
for each link latency `astra bench` with Astra's single device and ASTRA at 2 devices (real
processes, wall clock) and at 4 (composed, per-device CPU time plus the link model). Odd rounds
run the steps in reverse order. The goal ratio 0.9 N t_ASTRA / t_best (at most 1 meets issue
12's goal of 1/(0.9 N) of the best single device) is taken within each round, on the ASTRA
row's own clock: wall for processes, CPU for composed. t_best is the faster of the engine and
Astra's own single device in that round.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from astra.net.link import parse_latency
from astra.provenance import cpu_label, provenance
from astra.storage import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # a script beside its sibling benchmarks
from regimes_summary import lower_bound_ms  # noqa: E402
from report import EFFICIENCY  # noqa: E402  # peers.sh's goal (this script's own folder)

MODELS = {
    "smollm2": ("--model smollm2-135m --tokens 1024 --bandwidths 10mbit", "llama.cpp F32"),
    "dinov2": ("--model dinov2-s --tokens 1025 --bandwidths 10mbit --tables", "onnxruntime"),
}
RUNS = (("processes", 2), ("composed", 4))


def _run(cmd: list[str], timeout_s: float) -> None:
    """Run one step; on failure stop with its command and the last lines it printed."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise SystemExit(f"head-to-head: {' '.join(cmd[:3])} ... exited {done.returncode}:\n{tail}")


def engine_pass(model: str, prepared: Path, peers_python: Path, tmp: Path) -> dict:
    """One timed pass of the model's peer engine in a fresh process: wall and CPU ms."""
    out = tmp / f"{model}-engine.json"
    if model == "smollm2":
        script, extra = "llamacpp_bench.py", ["--only", "f32-faon", "--new-tokens", "1"]
    else:
        script, extra = "ort_bench.py", []
    cmd = [str(peers_python), str(ROOT / "benchmarks/peers" / script),
           "--prepared", str(prepared), "--out", str(out), "--repeats", "1", *extra]
    _run(cmd, timeout_s=600)
    record = json.loads(out.read_text())
    if model == "smollm2":
        r = record["results"]["f32-faon"]
        return {"wall_ms": r["prefill_ms_median"], "cpu_ms": r["prefill_cpu_ms_median"]}
    return {"wall_ms": record["forward_ms_median"], "cpu_ms": record["forward_cpu_ms_median"]}


def astra_bench(
    model: str, mode: str, devices: int, latency: str, tmp: Path, placement: str
) -> dict:
    """`astra bench` with single and astra, one repeat: both records' total_ms."""
    out = tmp / f"{model}-{mode}-{latency}"
    # encoders: every placement gives equal chunks (every token sees every key)
    chunks = ["--placement", placement] if model == "smollm2" else []
    cmd = [str(ROOT / ".venv/bin/astra"), "bench", *shlex.split(MODELS[model][0]), *chunks,
           "--mode", mode, "--devices", str(devices), "--latency", latency,
           "--methods", "single,astra", "--repeats", "1", "--out", str(out)]
    _run(cmd, timeout_s=900)
    records = json.loads((out / "bench.json").read_text())["records"]
    by_method = {r["method"]: r for r in records}
    single, astra = by_method["single"], by_method["astra"]
    causal = model == "smollm2"
    return {"single_ms": single["total_ms"], "astra_ms": astra["total_ms"],
            "work_vs_single": astra.get("work_vs_single"),
            # the least time this run's own work and the link allow, and the least a split
            # with no extra work at all would allow (W = one device's pass)
            "bound_ms": lower_bound_ms(astra, causal),
            "zero_overhead_bound_ms": lower_bound_ms(astra, causal, single["total_ms"])}


def one_round(r: int, models: list[str], latencies: list[str], prepared: Path,
              peers_python: Path, placement: str, log) -> dict:
    steps = [(m, None, None, None) for m in models]  # the engines' passes
    steps += [(m, mode, n, lat) for m in models for lat in latencies for mode, n in RUNS]
    if r % 2:
        steps.reverse()  # drift within a round falls on both sides alike
    out: dict = {m: {"runs": {}} for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        for model, mode, n, lat in steps:
            t0 = time.perf_counter()
            if mode is None:
                out[model]["engine"] = engine_pass(model, prepared, peers_python, Path(tmp))
                what = MODELS[model][1]
            else:
                run = astra_bench(model, mode, n, lat, Path(tmp), placement)
                out[model]["runs"][f"{mode}-{n}-{lat}"] = run
                what = f"astra {mode} x{n} latency {lat}"
            log(f"round {r + 1} {model}: {what} ({time.perf_counter() - t0:.0f} s)")
    return out


def ratios(rounds: list[dict], model: str, latencies: list[str]) -> list[dict]:
    """Per run: each round's goal ratio and Astra single / engine, then their medians."""
    rows = []
    for mode, n in RUNS:
        for lat in latencies:
            clock = "wall_ms" if mode == "processes" else "cpu_ms"
            goal, single_vs_engine, astra_ms, engine_ms, single_ms = [], [], [], [], []
            at_bound, at_zero_overhead = [], []
            for rnd in rounds:
                engine = rnd[model]["engine"][clock]
                run = rnd[model]["runs"][f"{mode}-{n}-{lat}"]
                best = min(engine, run["single_ms"])
                goal.append(round(EFFICIENCY * n * run["astra_ms"] / best, 3))
                if run.get("bound_ms") is not None:
                    at_bound.append(round(EFFICIENCY * n * run["bound_ms"] / best, 3))
                    at_zero_overhead.append(
                        round(EFFICIENCY * n * run["zero_overhead_bound_ms"] / best, 3)
                    )
                single_vs_engine.append(round(run["single_ms"] / engine, 3))
                astra_ms.append(run["astra_ms"])
                engine_ms.append(engine)
                single_ms.append(run["single_ms"])
            rows.append({
                "model": model, "mode": mode, "devices": n, "latency": lat,
                "clock": "wall" if mode == "processes" else "CPU",
                "engine_ms": engine_ms, "astra_single_ms": single_ms, "astra_ms": astra_ms,
                "goal_ratio": goal, "goal_ratio_median": statistics.median(goal),
                "goal_at_bound": at_bound,
                "goal_at_zero_overhead_bound": at_zero_overhead,
                "single_vs_engine": single_vs_engine,
                "single_vs_engine_median": statistics.median(single_vs_engine),
            })
    return rows


def markdown(result: dict) -> str:
    prov = result["provenance"]
    lines = [
        "# Issue 12's goal head to head: engine and ASTRA alternated round by round",
        "",
        f"Run {prov['date']} at commit `{prov['git_commit']}` on {cpu_label(prov)} "
        f"({prov['cores']} cores), with `{result['command']}` ({result['rounds']} rounds, "
        f"{result['minutes']} min; SmolLM2's placement: {result.get('placement', 'contiguous')}). "
        "One thread per engine and per device. How it runs: "
        "`benchmarks/peers/head_to_head.py`'s docstring.",
        "",
        "*goal* = 0.9 N t_ASTRA / t_best per round, t_best the faster of the engine and Astra's "
        "single device in that round (at most 1.00 meets the goal). *at bound*: the same ratio "
        "for the least time the run's own work and the link allow (`regimes_summary.py`'s "
        "`lower_bound_ms`: causal W/N + (N-1) lambda, encoder (W - O)/N + L max(lambda + t_b, "
        "O/(N L)) + lambda); *zero overhead*: for that bound with W = one device's pass, a split "
        "that costs no extra work (above 1.00: out of reach for any ASTRA runtime on this "
        "machine and link). *single / engine* = Astra's single device over the engine, same "
        "round and clock. Medians, every round in brackets.",
        "",
        "| model | engine | ASTRA | link latency | clock | engine ms | Astra single ms | ASTRA ms "
        "| goal | at bound | zero overhead | single / engine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(values, fmt):
        med = statistics.median(values)
        return f"**{fmt.format(med)}** ({' / '.join(fmt.format(v) for v in values)})"

    def bound(values):
        return f"{statistics.median(values):.2f}" if values else "-"

    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {MODELS[row['model']][1]} | {row['devices']} devices "
            f"({row['mode']}) | {row['latency']} | {row['clock']} "
            f"| {statistics.median(row['engine_ms']):,.0f} "
            f"| {statistics.median(row['astra_single_ms']):,.0f} "
            f"| {statistics.median(row['astra_ms']):,.0f} | {cell(row['goal_ratio'], '{:.2f}')} "
            f"| {bound(row['goal_at_bound'])} | {bound(row['goal_at_zero_overhead_bound'])} "
            f"| {cell(row['single_vs_engine'], '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--models", default="smollm2,dinov2")
    ap.add_argument("--latencies", default="0,20ms")
    ap.add_argument("--placement", default="contiguous", choices=("contiguous", "balanced"),
                    help="SmolLM2's token placement (astra bench --placement)")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/peers"))
    ap.add_argument("--md", type=Path, default=Path("benchmarks/peers-head-to-head.md"))
    ap.add_argument("--prepared", type=Path, default=Path(
        os.environ.get("ASTRA_HOME", Path.home() / ".cache/astra")) / "peers/prepared.json")
    ap.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers/bin/python")
    args = ap.parse_args()
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: expected at least 1")
    for path, how in ((args.prepared, "run benchmarks/peers.sh once"),
                      (args.peers_python, "run benchmarks/peers.sh once")):
        if not path.exists():
            ap.error(f"{path} does not exist: {how}")
    latencies = args.latencies.split(",")
    for lat in latencies:  # checked before any round starts, as astra bench parses them
        try:
            parse_latency(lat)
        except ValueError as exc:
            ap.error(f"--latencies: {exc}")

    def log(msg: str) -> None:
        print(f"head-to-head: {msg}", file=sys.stderr, flush=True)

    t0 = time.time()
    started = provenance()  # the code as the rounds began
    command = "benchmarks/peers/head_to_head.py " + " ".join(sys.argv[1:])
    rounds: list[dict] = []
    for r in range(args.rounds):
        rounds.append(
            one_round(r, models, latencies, args.prepared, args.peers_python, args.placement, log)
        )
        result = {  # written after every round: a failure later keeps the rounds done
            "command": command,
            "provenance": {**started, "command": command},
            "rounds": len(rounds),
            "placement": args.placement,
            "minutes": round((time.time() - t0) / 60, 1),
            "raw": rounds,
            "rows": [row for m in models for row in ratios(rounds, m, latencies)],
        }
        write_json(args.results / f"head_to_head-{args.placement}.json", result)
        write_text(args.md, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
