"""Heterogeneous devices (paper App. D): an equal split, a speed-proportional split and the
balanced placement with speeds, against the ideal makespan, in the composed mode.

Each row is one ASTRA prefill of SmolLM2 on emulated devices of unequal speed: every rank's
compute is measured for real on one core, one rank at a time, and charged measured / speed
(astra.net.lockstep), then composed with the link model. Placements:
- `equal`: contiguous equal chunks (the speeds ignored: what a speed-blind split costs),
- `proportional`: contiguous chunks in proportion to speed (`--placement contiguous
  --device-speeds ...`),
- `balanced`: contiguous chunks that equalise fitted cost / speed (`--placement balanced
  --device-speeds ...`; costs fitted from one measured pass, astra.runner.fit_balanced_placement).

The ideal, per row: the work the devices measured in that very pass, at speed 1
(W = sum_d compute_d * speed_d), spread perfectly over the group's total speed S = sum_d speed_d,
plus what no split removes from a streamed causal prefill's critical path, one message per
device boundary: ideal = W / S + (N - 1) * (latency + largest message * 8 / bandwidth). That is
the makespan of a split in which every device finishes its own work at the same time
(causal_balanced_sizes' optimum) and each trails its predecessor by one message. `vs ideal` is
makespan / ideal. `ideal_best` uses the smallest W of the three placements instead (a split
that costs less work in total is better even if the others sit closer to their own bound).

    .venv/bin/python benchmarks/heterogeneous.py --vq-groups 1,32   # -> benchmarks/results/
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from astra.bench import timing_artefact
from astra.hub import resolve_model
from astra.models import load_model, model_spec
from astra.net.link import LinkConfig, parse_latency
from astra.parallel.config import AstraConfig
from astra.parallel.passes import embed_inputs
from astra.parallel.placement import PlacementConfig
from astra.provenance import provenance
from astra.runner import Job, RunConfig, build_inputs, run_ranks, summarize
from astra.storage import write_json

GROUPS = {"1:0.5": (1.0, 0.5), "1:1:0.5:0.5": (1.0, 1.0, 0.5, 0.5)}
PLACEMENTS = ("equal", "proportional", "balanced")


def placement_for(kind: str, speeds: tuple[float, ...]) -> PlacementConfig:
    n = len(speeds)
    if kind == "equal":
        return PlacementConfig(n)
    if kind == "proportional":
        return PlacementConfig(n, kind="contiguous", weights=speeds)
    return PlacementConfig(n, kind="balanced", weights=speeds)


def run_one(base, model_dir, artefact, inputs, speeds, kind, bandwidth, latency_ms, method):
    """One prefill of `method` on devices of `speeds` (composed mode): its row."""
    world = len(speeds) if method != "single" else 1
    job = Job(
        method=method,
        model_dir=str(model_dir),
        artefact=str(artefact) if method == "astra" else None,
        inputs=inputs,
        placement=placement_for(kind, speeds) if world > 1 else PlacementConfig(1),
        class_tokens="none",
        new_tokens=1,
        link=LinkConfig(bandwidth_mbps=bandwidth, latency_ms=latency_ms),
        timeout_s=1800.0,
        overlap=True,
        use_tables=False,
        decoder=True,
        decode=False,  # the prefill: time to the first token's logits
        warmup=True,  # one untimed pass first (and two fit passes for balanced)
        model=base,
        device_speeds=speeds if world > 1 else None,
    )
    results = run_ranks(job, world, "composed")
    record = summarize(job, results, world, "composed")
    makespan = max(r["prefill_ms"] for r in results)
    row = {
        "makespan_ms": round(makespan, 2),
        "ttft_ms": round(record["ttft_ms"], 2),
        "tokens_per_device": record["tokens_per_device"],
        "compute_ms_per_device": record["compute_ms_per_device"],
        "wait_ms_per_device": record["wait_ms_per_device"],
        "bytes_sent_per_device": record["bytes_sent_per_device"],
        "placement_cost": record.get("placement_cost"),
    }
    if world > 1:
        row["work_ms_at_speed_1"] = round(
            sum(c * s for c, s in zip(record["compute_ms_per_device"], speeds)), 2
        )
    return row


def boundary_ms(row, speeds, bandwidth, latency_ms, num_blocks) -> float:
    """(N - 1) x (latency + the largest single message's transmission): streamed, contiguous
    placement, device d sends each block's codes once to each of the N - 1 - d later devices."""
    n = len(speeds)
    messages = [row["bytes_sent_per_device"][d] / (num_blocks * (n - 1 - d)) for d in range(n - 1)]
    transmit = max(messages) * 8 / (bandwidth * 1e6) * 1e3
    return (n - 1) * (latency_ms + transmit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--bandwidth-mbps", type=float, default=10.0)
    parser.add_argument("--latencies", default="0,20ms", help="comma-separated, e.g. 0,20ms")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved; the median is kept")
    parser.add_argument("--groups", default=",".join(GROUPS), help="of " + ", ".join(GROUPS))
    parser.add_argument(
        "--vq-groups", default="1", help="ASTRA's G, comma-separated (K=1024); default 1"
    )
    parser.add_argument("--out", default="benchmarks/results/heterogeneous.json")
    args = parser.parse_args()
    latencies = [parse_latency(t) for t in args.latencies.split(",") if t.strip()]
    groups = {name: GROUPS[name] for name in args.groups.split(",") if name.strip()}
    model_dir = resolve_model(args.model)
    inputs, decoder, description = build_inputs(
        RunConfig(model=args.model, tokens=args.tokens, devices=1, new_tokens=1), model_dir
    )
    assert decoder, "heterogeneous placement is measured on a causal prefill"
    base = load_model(model_dir)
    num_blocks = len(base.blocks)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    with torch.no_grad():
        embed_inputs(base, inputs)  # the math libraries' start-up, outside any pass
    vq_groups = [int(g) for g in args.vq_groups.split(",") if g.strip()]
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    artefacts = {}
    for g in vq_groups:  # timing-only codebooks: values do not change a pass's time
        config = AstraConfig(
            quant_point=model_spec(model_dir).quant_point, num_groups=g, codebook_size=1024
        )
        path = tmp / f"astra-hetero-{os.getpid()}-g{g}.safetensors"
        artefacts[g] = timing_artefact(model_dir, config, inputs, path)
    plan = [("single", None, None, latencies[0], None)]
    for g in vq_groups:
        for latency_ms in latencies:
            for name, speeds in groups.items():
                for kind in PLACEMENTS:
                    plan.append((name, speeds, kind, latency_ms, g))
    runs: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
    try:
        for repeat in range(args.repeats):  # interleaved: drift hits every placement alike
            for i, (name, speeds, kind, latency_ms, g) in enumerate(plan):
                t0 = time.perf_counter()
                if name == "single":
                    row = run_one(base, model_dir, None, inputs, (1.0,), "equal",
                                  args.bandwidth_mbps, latency_ms, "single")  # fmt: skip
                else:
                    row = run_one(base, model_dir, artefacts[g], inputs, speeds, kind,
                                  args.bandwidth_mbps, latency_ms, "astra")  # fmt: skip
                runs[i].append(row)
                print(f"#{repeat + 1} G={g or '-'} {name:12s} {kind or '-':13s} "
                      f"{latency_ms:4g} ms  makespan {row['makespan_ms']:8.1f} ms  "
                      f"tokens {row['tokens_per_device']}  ({time.perf_counter() - t0:.0f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    finally:
        for path in artefacts.values():
            path.unlink(missing_ok=True)
    rows = []
    single_ms = None
    for i, (name, speeds, kind, latency_ms, g) in enumerate(plan):
        passes = sorted(runs[i], key=lambda r: r["makespan_ms"])
        row = dict(passes[(len(passes) - 1) // 2])  # the lower median: a real pass
        row["makespan_repeats_ms"] = [r["makespan_ms"] for r in runs[i]]
        if name == "single":
            single_ms = row["makespan_ms"]
            rows.append({"group": "single (speed 1)", **row})
            continue
        c = boundary_ms(row, speeds, args.bandwidth_mbps, latency_ms, num_blocks)
        ideal = row["work_ms_at_speed_1"] / sum(speeds) + c
        row.update(
            vq_groups=g, group=name, speeds=list(speeds), placement=kind, latency_ms=latency_ms,
            boundary_ms=round(c, 2), ideal_ms=round(ideal, 2),
            vs_ideal=round(row["makespan_ms"] / ideal, 4),
            speedup_vs_single=round(single_ms / row["makespan_ms"], 3),
            ideal_no_overhead_ms=round(single_ms / sum(speeds) + c, 2),
        )  # fmt: skip
        rows.append(row)
    for row in rows:  # the smallest work any placement of the same group and link measured
        if "speeds" in row:
            same = [r for r in rows if r.get("group") == row["group"]
                    and r.get("latency_ms") == row["latency_ms"]
                    and r.get("vq_groups") == row["vq_groups"]]  # fmt: skip
            best = min(r["work_ms_at_speed_1"] for r in same) / sum(row["speeds"])
            row["ideal_best_ms"] = round(best + row["boundary_ms"], 2)
            row["vs_ideal_best"] = round(row["makespan_ms"] / row["ideal_best_ms"], 4)
    for row in rows:
        if "speeds" in row:
            print(f"G={row['vq_groups']:<2d} {row['group']:12s} {row['placement']:13s} "
                  f"{row['latency_ms']:4g} ms  "
                  f"makespan {row['makespan_ms']:7.1f}  ideal {row['ideal_ms']:7.1f}  "
                  f"x{row['vs_ideal']:.3f} (vs best-work ideal x{row['vs_ideal_best']:.3f})  "
                  f"tokens {row['tokens_per_device']}")  # fmt: skip
    settings = {
        "model": args.model, "model_dir": str(model_dir), "input": description,
        "tokens": args.tokens, "bandwidth_mbps": args.bandwidth_mbps, "latencies_ms": latencies,
        "method": "astra, kv point, K=1024 (timing-only codebooks), fp32, streamed "
                  "exchange, overlap, one thread per device, composed mode",
        "vq_groups": vq_groups,
        "repeats": args.repeats, "num_blocks": num_blocks,
        "ideal": "work_ms_at_speed_1 / sum(speeds) + (N-1) x (latency + largest message "
                 "x 8 / bandwidth); work_ms_at_speed_1 = sum_d compute_ms_d x speed_d",
    }  # fmt: skip
    meta = provenance()
    meta["command"] = ".venv/bin/python " + shlex.join([os.path.relpath(__file__), *sys.argv[1:]])
    write_json(Path(args.out), {
        **meta, "settings": settings, "rows": rows,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
    })  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
