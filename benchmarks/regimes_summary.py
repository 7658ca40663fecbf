"""Issue 12's prefill targets, read off the runs of `benchmarks/regimes.sh`, as markdown.

For every run: ASTRA's speed-up over one device (median of interleaved repeats, and each
repeat's), the work of splitting (every device's compute over one device's), the ratios over
full-precision SP and TP, and the lower bound the link and the measured work set:

- causal prefill, streamed (SmolLM2): device d needs device d-1's codes of every block, so each
  device boundary adds at least one latency:  T_N >= W/N + (N-1) lambda
- encoder, one all-gather per block (DINOv2): in each block a device can hide only its own
  projections and local attention (O) behind the exchange, which takes lambda + its uplink time
  t_b; the class-token replicas are gathered once more at the end:
      T_N >= (W - O)/N + L max(lambda + t_b, O/(N L)) + lambda

W and O are the run's own measured work summed over devices (work_breakdown_ms), L the blocks,
t_b = (bytes a device sends per block) x 8 / bandwidth.

    .venv/bin/python benchmarks/regimes_summary.py [--results benchmarks/results/latency/regimes]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BLOCKS = {"smollm2-135m": 30, "dinov2-s": 12}


def load(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/bench.json"))}


def lower_bound_ms(record: dict, causal: bool, work_ms: float | None = None) -> float | None:
    """The link-and-work bound above for one ASTRA record (None without a work breakdown).
    `work_ms` replaces W, the run's work summed over devices: with one device's pass time it
    is the bound of a split that costs no extra work at all."""
    work = record.get("work_breakdown_ms")
    if not work:
        return None
    n, lam = record["devices"], record["latency_ms"]
    total = sum(record["compute_ms_per_device"]) if work_ms is None else work_ms
    if causal:
        return total / n + (n - 1) * lam
    blocks = BLOCKS[record["model"]]
    hidden = work.get("project", 0.0) + work.get("local_attention", 0.0)
    t_b = record["bytes_per_device"] / blocks * 8 / (record["bandwidth_mbps"] * 1e3)  # ms
    return (total - hidden) / n + blocks * max(lam + t_b, hidden / (n * blocks)) + lam


def rows(runs: dict[str, dict]) -> list[dict]:
    out = []
    for name, run in runs.items():
        records = run["records"]
        single = next(r for r in records if r["method"] == "single")
        causal = "smollm2" in name
        for r in records:
            if r["method"] != "astra":
                continue
            others = {
                m: next((o for o in records if o["method"] == m and o["devices"] == r["devices"]),
                        None)
                for m in ("sp-fp32", "tp")
            }
            bound = lower_bound_ms(r, causal)
            out.append({
                "run": name,
                "mode": "processes" if "processes" in name else "composed",
                "dtype": run["config"].get("dtype", "float32"),
                "search": r.get("search"),
                "latency_ms": r["latency_ms"],
                "devices": r["devices"],
                "single_ms": single["total_ms"],
                "astra_ms": r["total_ms"],
                "speedup": r["speedup_vs_single"],
                "per_repeat": r.get("speedup_per_repeat"),
                "work_vs_single": r.get("work_vs_single"),
                "over_sp": others["sp-fp32"]["total_ms"] / r["total_ms"] if others["sp-fp32"]
                else None,
                "over_tp": others["tp"]["total_ms"] / r["total_ms"] if others["tp"] else None,
                "bound_ms": bound,
                "above_bound": r["total_ms"] / bound - 1 if bound else None,
                "git_commit": run.get("git_commit"),
            })
    return out


def markdown(table: list[dict]) -> str:
    head = ("| run | devices | single ms | ASTRA ms | speed-up (per repeat) | work / 1 device | "
            "over SP-fp32 | over TP | bound ms | above bound | git |")
    lines = [head, "|" + "---|" * 11]
    for r in table:
        reps = " / ".join(f"{x:.2f}" for x in r["per_repeat"] or [])
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['run']} | {r['devices']} | {r['single_ms']:.0f} | {r['astra_ms']:.0f} | "
            f"**{r['speedup']:.2f}x** ({reps}) | {fmt(r['work_vs_single'], '.3f')} | "
            f"{fmt(r['over_sp'], '.1f')} | {fmt(r['over_tp'], '.1f')} | "
            f"{fmt(r['bound_ms'], '.0f')} | "
            f"{fmt(None if r['above_bound'] is None else 100 * r['above_bound'], '+.1f')} % | "
            f"{r['git_commit']} |"
        )
    lines.append("")
    lines.append("(ratios over SP-fp32 and TP in x)")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results/latency/regimes")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    table = rows(load(Path(args.results)))
    print(markdown(table), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
