"""`astra bench --trace`: requests served per method over a bandwidth trace (paper Fig. 11).

Each method's prefill is measured with astra.bench (same runtime, same link model) at the
trace's bandwidth states, fitted as compute + bytes/bandwidth (astra.trace.fit_link) and
replayed by a closed-loop client over the trace (astra.trace.replay). With several G given,
ASTRA runs once per G, and `adaptive` picks a G per request (astra.trace.AdaptivePolicy);
for decoders each G's perplexity is measured too, so the adaptive row reports what its
choices cost in accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from astra.bench import BenchConfig, run_bench
from astra.provenance import provenance
from astra.storage import atomic_path, write_json, write_text
from astra.trace import AdaptivePolicy, BandwidthTrace, MeasuredTimes, fit_link, replay


@dataclass(frozen=True)
class TraceBenchConfig:
    bench: BenchConfig  # model, devices (one count), tokens (one), methods, latency, mode...
    groups_set: tuple[int, ...] = (1,)  # ASTRA runs once per G
    adaptive: bool = False  # add the per-request choice of G (needs >= 2 G)
    min_groups: int = 1  # the adaptive policy's quality floor
    tolerance: float = 0.10  # adaptive: a G fits while its time is within this of its best
    perplexity_sequences: int = 8  # decoders: held-out sequences per G for perplexity
    perplexity_tokens: int = 256
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.bench.devices) != 1 or len(self.bench.tokens) != 1:
            raise ValueError("--trace takes one device count and one token count")
        if self.adaptive and len(self.groups_set) < 2:
            raise ValueError(f"--adaptive needs two or more --groups-set, got {self.groups_set}")
        if self.adaptive and not any(g >= self.min_groups for g in self.groups_set):
            raise ValueError(
                f"--min-groups {self.min_groups} is above every G in {list(self.groups_set)}"
            )
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")


def run_trace_bench(config: TraceBenchConfig, trace: BandwidthTrace, log=print) -> dict:
    states = trace.states()
    log(f"measuring at {', '.join(f'{s:g}' for s in states)} Mbit/s ({trace.source})")
    base = replace(config.bench, bandwidths_mbps=states)
    others = tuple(m for m in base.methods if m != "astra")
    records: list[dict] = []
    if others:
        records += run_bench(replace(base, methods=others))
    if "astra" in base.methods:
        for g in config.groups_set:
            for r in run_bench(replace(base, methods=("astra",), groups=g)):
                if r["method"] == "astra":
                    records.append(r)
    points: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if "total_ms" not in r:
            log(f"skipped {r['method']}: {r.get('skipped')}")
            continue
        label = r["method"] if r["method"] != "astra" else f"astra G={r['groups']}"
        points.setdefault(label, []).append((r["bandwidth_mbps"], r["total_ms"] / 1e3))
    fits = {label: fit_link(p) for label, p in points.items()}
    times = {label: MeasuredTimes(tuple(p)) for label, p in points.items()}
    served = {
        label: replay(trace, lambda now, seen, t=t, label=label: (label, t.seconds(now)))
        for label, t in times.items()
    }
    perplexity: dict[str, float] = {}
    if config.adaptive:
        by_g = {
            int(label.split("=")[1]): t
            for label, t in times.items()
            if label.startswith("astra G=")
        }
        policy = AdaptivePolicy(by_g, config.min_groups, config.tolerance)
        served["astra adaptive"] = replay(trace, policy.choose)
    if base.methods and "astra" in base.methods and len(config.groups_set) > 1:
        perplexity = _perplexities(config, log)
    rows = []
    for label, requests in served.items():
        row = {"label": label, "served": len(requests)}
        if label in fits:
            fit = fits[label]
            row |= {"fit": asdict(fit), "measured": points[label]}
        if label.startswith("astra G=") and label in perplexity:
            row["perplexity"] = perplexity[label]
        if label == "astra adaptive":
            chosen = [r.label for r in requests]
            row["chosen"] = {g: chosen.count(g) for g in sorted(set(chosen))}
            if perplexity:
                row["perplexity"] = sum(perplexity[f"astra {g}"] for g in chosen) / len(chosen)
        rows.append(row)
    return {
        "trace": {
            "source": trace.source,
            "duration_s": trace.duration_s,
            "states_mbps": list(states),
            "mean_mbps": _mean_rate(trace),
        },
        "settings": {
            "model": base.model,
            "devices": base.devices[0],
            "tokens": base.tokens[0],
            "latency_ms": base.latency_ms,
            "mode": base.mode,
            "dtype": base.dtype,
            "groups_set": list(config.groups_set),
            "min_groups": config.min_groups,
            "tolerance": config.tolerance,
        },
        "rows": rows,
        "requests": {
            label: [[round(r.start_s, 3), round(r.seconds, 4), r.mbps, r.label] for r in reqs]
            for label, reqs in served.items()
        },
        "trace_points": [list(trace.times_s), list(trace.mbps)],
    }


def _mean_rate(trace: BandwidthTrace) -> float:
    ends = list(trace.times_s[1:]) + [trace.duration_s]
    total = sum((e - s) * m for s, e, m in zip(trace.times_s, ends, trace.mbps))
    return round(total / trace.duration_s, 2)


def _perplexities(config: TraceBenchConfig, log) -> dict[str, float]:
    """Held-out perplexity of each G's training-free codebooks (decoders; else empty)."""
    from astra.group.config import QuantConfig
    from astra.hub import resolve_model
    from astra.models import load_model, model_kind
    from astra.parallel.artefact import load_astra
    from astra.parallel.placement import PlacementConfig
    from astra.parallel.train import evaluate
    from astra.runner import ensure_codebooks
    from astra.tasks import TaskConfig, make_task

    bench = config.bench
    model_dir = resolve_model(bench.model)
    if model_kind(model_dir) != "decoder":
        log("perplexity: decoders only; the adaptive row reports requests served")
        return {}
    out = {}
    for g in config.groups_set:
        quant = QuantConfig(groups=g, codebook_size=bench.codebook_size, point=bench.quant_point)
        log(f"perplexity of G={g} (calibrating its codebooks first if none are cached)...")
        artefact = ensure_codebooks(model_dir, quant, bench.model)
        astra = load_astra(artefact, load_model(model_dir), model_dir)
        task = make_task(astra.model, model_dir, TaskConfig(seq_len=config.perplexity_tokens))
        placement = PlacementConfig(bench.devices[0])
        out[f"astra G={g}"] = evaluate(
            astra, task, placement, limit=config.perplexity_sequences, progress=False
        )
    return out


def write_trace_outputs(result: dict, out: Path, command: str) -> list[Path]:
    """trace.json (everything, with the command and commit), trace.md (the table) and
    trace.png (bandwidth and per-request latency over time)."""

    out.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), "command": command}
    commit = meta["git_commit"]
    paths = [out / "trace.json", out / "trace.md", out / "trace.png"]
    write_json(paths[0], meta | result)
    s = result["settings"]
    lo, hi = min(result["trace"]["states_mbps"]), max(result["trace"]["states_mbps"])
    lines = [
        f"Requests served in {result['trace']['duration_s']:g} s of {result['trace']['source']}"
        f" (mean {result['trace']['mean_mbps']} Mbit/s, latency {s['latency_ms']:g} ms), "
        f"{s['model']}, {s['devices']} devices, {s['tokens']} tokens, {s['mode']} mode.",
        "",
        f"| method | requests served | prefill at {lo:g} / {hi:g} Mbit/s (s) | "
        "residual of compute + bytes/bandwidth | perplexity |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        fit = row.get("fit")
        timing = "-"
        if fit:
            t = MeasuredTimes(tuple(map(tuple, row["measured"])))
            timing = f"{t.seconds(lo):.2f} / {t.seconds(hi):.2f}"
        residual = f"{fit['max_residual'] * 100:.1f} %" if fit else "-"
        ppl = f"{row['perplexity']:.2f}" if "perplexity" in row else "-"
        label = row["label"]
        if "chosen" in row:
            label += " (" + ", ".join(f"{g}: {n}" for g, n in row["chosen"].items()) + ")"
        lines.append(f"| {label} | {row['served']} | {timing} | {residual} | {ppl} |")
    lines += ["", f"Command: `{command}` (commit {commit})."]
    write_text(paths[1], "\n".join(lines) + "\n")
    _plot(result, paths[2])
    return paths


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    times, rates = result["trace_points"]
    top.step(times + [result["trace"]["duration_s"]], rates + rates[-1:], where="post")
    top.set_ylabel("bandwidth (Mbit/s)")
    top.set_title("bandwidth trace and per-request latency")
    for label, reqs in result["requests"].items():
        if reqs:
            bottom.plot([r[0] for r in reqs], [r[1] for r in reqs], ".", ms=3, label=label)
    bottom.set_yscale("log")
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("request latency (s)")
    bottom.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
