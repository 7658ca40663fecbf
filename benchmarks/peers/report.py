"""Collect one benchmarks/peers.sh run into peers.json and the peers.md tables.

    .venv/bin/python benchmarks/peers/report.py --results benchmarks/results/peers \
        --build DIR --command "bash benchmarks/peers.sh" --md benchmarks/peers.md

Reads RESULTS/raw/{llamacpp,ort,hf}.json (the peer engines), RESULTS/astra/*/bench.json
(`astra bench`: prefill, interleaved repeats) and RESULTS/astra/run-*.json (`astra run`: time to
first token and per output token), RESULTS/raw/uptime_{before,after}.txt and the llama.cpp
build folder; writes RESULTS/peers.json (astra.storage.write_json: atomic) and the markdown.
A section of the markdown between `<!-- notes -->` and `<!-- /notes -->` is kept across runs
(the hand-written reading of the numbers); everything else is regenerated.

Two clocks. The peers and Astra's `processes` rows are wall time (what a user waits). Astra's
`composed` rows time every device's compute as its thread's CPU time (time.thread_time) and add
the link model, so on a shared machine they do not see other programs' load; the peers are
timed on that clock too (their thread's CPU time), and the goal table compares each ASTRA row
with single devices on its own clock.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from astra.provenance import cpu_label, provenance
from astra.storage import write_json, write_text

EFFICIENCY = 0.9  # issue 12's goal: N devices within 1/(0.9 N) of the best single device


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def med(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def astra_benches(root: Path) -> list[dict]:
    """Every `astra bench` record, with its run's name and command."""
    rows = []
    for path in sorted(root.glob("*/bench.json")):
        bench = load(path)
        if not bench:
            continue
        for r in bench["records"]:
            if "total_ms" not in r:
                rows.append({"run": path.parent.name, "skipped": r.get("skipped"), **r})
                continue
            rows.append(
                {
                    "run": path.parent.name,
                    "command": bench["command"],
                    "model": r["model"],
                    "method": r["method"],
                    "devices": r["devices"],
                    "mode": r["mode"],
                    "dtype": r["dtype"],
                    "tokens": r["tokens"],
                    "bandwidth_mbps": r["bandwidth_mbps"],
                    "latency_ms": r["latency_ms"],
                    "ms_median": round(r["total_ms"], 1),
                    "ms_repeats": [round(x, 1) for x in r["repeats_ms"]],
                    "compute_ms": r.get("compute_ms"),
                    "wait_ms": r.get("wait_ms"),
                    "bytes_per_device": r.get("bytes_per_device"),
                    "speedup_vs_single": r.get("speedup_vs_single"),
                    "speedup_per_repeat": r.get("speedup_per_repeat"),
                }
            )
    return rows


def astra_runs(root: Path) -> list[dict]:
    """Every `astra run` record (TTFT and TPOT with decoding), with its file's name."""
    rows = []
    for path in sorted(root.glob("run-*.json")):
        run = load(path)
        if not run:
            continue
        cfg = run["config"]
        for r in run["records"]:
            rows.append(
                {
                    "run": path.stem,
                    "model": run["model"],
                    "method": r["method"],
                    "devices": r["devices"],
                    "mode": r["mode"],
                    "dtype": r["dtype"],
                    "tokens": cfg["tokens"],
                    "new_tokens": cfg["new_tokens"],
                    "bandwidth_mbps": cfg["bandwidth_mbps"],
                    "latency_ms": cfg["latency_ms"],
                    "ttft_ms": round(r["ttft_ms"], 1),
                    "tpot_ms": round(r["tpot_ms"], 2) if r.get("tpot_ms") is not None else None,
                    "generated_ids": r.get("generated_ids"),
                }
            )
    return rows


def agreement(a: list[int] | None, b: list[int] | None) -> int | None:
    """How many leading generated tokens two greedy engines share."""
    if not a or not b:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fmt_ms(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def fmt_reps(median: float | None, reps: list[float] | None, digits: int = 0) -> str:
    if median is None:
        return "-"
    text = f"**{fmt_ms(median, digits)}**" if digits == 0 else fmt_ms(median, digits)
    if reps and len(reps) > 1:
        text += " (" + ", ".join(fmt_ms(x, digits) for x in reps) + ")"
    return text


def lat(ms: float) -> str:
    return "0" if ms == 0 else f"{ms:g} ms"


def klass(precision: str) -> str:
    return {"float32": "fp32", "F32 GGUF": "fp32", "bfloat16": "bf16", "BF16 GGUF": "bf16"}.get(
        precision, precision
    )


def peer_row(engine: str, precision: str, v: dict, key: str, ref_ids) -> dict:
    """A single-device peer, timed on both clocks."""
    row = {
        "engine": engine,
        "precision": precision,
        "class": klass(precision),
        "devices": 1,
        "mode": "-",
        "link": "-",
        "clock": "wall",
        "ms_median": v[f"{key}_ms_median"],
        "ms_repeats": v[f"{key}_ms_repeats"],
        "cpu_ms_median": v.get(f"{key}_cpu_ms_median"),
        "cpu_ms_repeats": v.get(f"{key}_cpu_ms_repeats"),
    }
    if "tpot_ms_median" in v:
        row.update(
            tpot_ms_median=v["tpot_ms_median"],
            tpot_ms_repeats=v["tpot_ms_repeats"],
            tpot_cpu_ms_median=v.get("tpot_cpu_ms_median"),
            agreement_vs_transformers_fp32=agreement(v.get("generated_ids"), ref_ids),
        )
    return row


def astra_rows(model: str, benches: list[dict], runs: list[dict], ref_ids) -> list[dict]:
    """Astra's single device (pooled over the bench runs, one row per clock) and every ASTRA
    bench row, with `astra run`'s decoding figures where a run matches."""
    rows = []
    bm = [b for b in benches if b.get("model") == model and "ms_median" in b]
    rm = [r for r in runs if r["model"] == model]
    for dt in ("float32", "bfloat16"):
        for clock, mode in (("wall", "processes"), ("cpu", "composed")):
            singles = [
                b for b in bm if b["method"] == "single" and b["dtype"] == dt and mode in b["mode"]
            ]
            if not singles:
                continue
            pooled = [x for b in singles for x in b["ms_repeats"]]
            row = {
                "engine": f"Astra single device ({mode} bench)",
                "precision": dt,
                "class": klass(dt),
                "devices": 1,
                "mode": mode,
                "link": "-",
                "clock": clock,
                "ms_median": med(pooled),
                "ms_repeats": pooled,
                "cpu_ms_median": med(pooled) if clock == "cpu" else None,
                "note": f"the single-device passes of {len(singles)} `astra bench` runs",
            }
            run_single = [r for r in rm if r["method"] == "single" and r["dtype"] == dt]
            if run_single and clock == "wall":  # `astra run`'s single device is a process
                row["tpot_ms_median"] = med([r["tpot_ms"] for r in run_single])
                row["tpot_ms_repeats"] = [r["tpot_ms"] for r in run_single]
                row["run_ttft_ms"] = [r["ttft_ms"] for r in run_single]
                row["agreement_vs_transformers_fp32"] = agreement(
                    run_single[0]["generated_ids"], ref_ids
                )
            rows.append(row)
        for b in sorted(
            (b for b in bm if b["method"] == "astra" and b["dtype"] == dt),
            key=lambda b: (b["devices"], b["latency_ms"]),
        ):
            row = {
                "engine": f"ASTRA ({b['mode']})",
                "precision": dt,
                "class": klass(dt),
                "devices": b["devices"],
                "mode": b["mode"],
                "link": f"{b['bandwidth_mbps']:g} Mbit/s, {lat(b['latency_ms'])}",
                "latency_ms": b["latency_ms"],
                "clock": "cpu" if b["mode"] == "composed" else "wall",
                "ms_median": b["ms_median"],
                "ms_repeats": b["ms_repeats"],
                "cpu_ms_median": b["ms_median"] if b["mode"] == "composed" else None,
                "speedup_vs_own_single": b["speedup_vs_single"],
                "speedup_per_repeat": b["speedup_per_repeat"],
                "wait_ms": b["wait_ms"],
                "bench_run": b["run"],
            }
            match = [
                r
                for r in rm
                if r["method"] == "astra"
                and r["dtype"] == dt
                and r["devices"] == b["devices"]
                and r["latency_ms"] == b["latency_ms"]
            ]
            if match:
                row["tpot_ms_median"] = match[0]["tpot_ms"]
                row["run_ttft_ms"] = match[0]["ttft_ms"]
                row["agreement_vs_transformers_fp32"] = agreement(
                    match[0]["generated_ids"], ref_ids
                )
            rows.append(row)
    return rows


def _target_entry(best: dict, key: str, n: int, astra_ms: float) -> dict:
    target = best[key] / (EFFICIENCY * n)
    return {
        "engine": f"{best['engine']} {best['precision']}",
        "ms": best[key],
        "target_ms": round(target, 1),
        "astra_over_target": round(astra_ms / target, 2),
    }


def goal_rows(model: str, rows: list[dict]) -> list[dict]:
    """Each ASTRA row against the best single device on its own clock: the same precision
    class, and any engine and precision."""
    out = []
    for r in rows:
        if r["devices"] == 1:
            continue
        key = "ms_median" if r["clock"] == "wall" else "cpu_ms_median"
        singles = [s for s in rows if s["devices"] == 1 and s.get(key) is not None]
        if r["clock"] == "wall":  # the composed single's figure is CPU time, not wall
            singles = [s for s in singles if s["clock"] == "wall"]
        if not singles:
            continue
        best_any = min(singles, key=lambda s: s[key])
        same = [s for s in singles if s["class"] == r["class"]] or [best_any]
        best_same = min(same, key=lambda s: s[key])
        n = r["devices"]

        entry = _target_entry
        out.append(
            {
                "model": model,
                "astra": f"{r['precision']}, {n} devices ({r['mode']})",
                "link": r["link"],
                "clock": r["clock"],
                "astra_ms": r["ms_median"],
                "best_same_precision": entry(best_same, key, n, r["ms_median"]),
                "best_any": entry(best_any, key, n, r["ms_median"]),
            }
        )
    return out


def markdown(out: dict) -> str:
    """The markdown tables and the computed comparison (no hand-written text)."""
    lines: list[str] = []
    add = lines.append
    prov, load_ = out["provenance"], out["machine_load"]
    add(
        f"Run {prov['date']} at commit `{prov['git_commit']}` on {cpu_label(prov)} "
        f"({prov['cores']} cores), with `{out['command']}`. Every engine runs at **one thread** "
        "(one per device for Astra's multi-device rows): " + out["threads_note"] + "."
    )
    add("")
    add(f"Machine load: before `{load_['uptime_before']}`; after `{load_['uptime_after']}`.")
    for when in ("before", "after"):
        busy = [x.replace("process: ", "") for x in load_[when] if x.startswith("process:")]
        pressure = [x for x in load_[when] if x.startswith("cpu pressure: some")]
        if busy or pressure:
            add(
                f"{when.capitalize()}: "
                + (
                    pressure[0].replace("cpu pressure: ", "CPU pressure ") + "; "
                    if pressure
                    else ""
                )
                + "busiest processes (%CPU, elapsed, command): "
                + "; ".join(f"`{' '.join(b.split()[:5])[:90]}`" for b in busy[:4])
                + "."
            )
    add("")
    add("Versions: " + "; ".join(f"{k}: {v}" for k, v in out["versions"].items()) + ".")
    add("")
    b = out.get("llama_cpp_build", {})
    if b:
        secs = f" ({b['build_seconds']} s)" if b.get("build_seconds") else ""
        add(f'llama.cpp build: `CMAKE_ARGS="{b.get("cmake_args")}"`, {b.get("status")}{secs}.')
        add("")
    add(
        "Clocks: *wall* is elapsed time; *CPU* is the measuring thread's CPU time. Astra's "
        "composed rows are per-device CPU time plus the link model, so compare them with the "
        "CPU column of the single-device rows."
    )
    add("")

    add("### SmolLM2-135M: 1024-token prefill (time to first token) and decoding")
    add("")
    add(
        f"The same 1024 prompt token ids for every engine; {out['new_tokens']} greedy new tokens, "
        f"time per output token (TPOT) over the last {out['new_tokens'] - 1}. Medians of "
        f"{out['repeats']} interleaved repeats, the repeats in brackets (Astra's single-device "
        "rows pool the single passes of its bench runs). ASTRA's TPOT comes from one "
        "`astra run` on the same link."
    )
    add("")
    add(
        "| engine | precision | devices | link | prefill ms, wall | prefill ms, CPU | "
        "TPOT ms, wall | TPOT ms, CPU | greedy tokens = transformers fp32 |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    new_tokens = out["new_tokens"]
    for row in out["smollm2"]["rows"]:
        wall = fmt_reps(row["ms_median"], row["ms_repeats"]) if row["clock"] == "wall" else "-"
        cpu = fmt_reps(row.get("cpu_ms_median"), row.get("cpu_ms_repeats"))
        if row["clock"] == "cpu":
            cpu = fmt_reps(row["ms_median"], row["ms_repeats"])
        agree = row.get("agreement_vs_transformers_fp32")
        add(
            f"| {row['engine']} | {row['precision']} | {row['devices']} | {row['link']} "
            f"| {wall} | {cpu} | {fmt_reps(row.get('tpot_ms_median'), None, 1)} "
            f"| {fmt_ms(row.get('tpot_cpu_ms_median'), 1)} "
            f"| {'-' if agree is None else f'{agree}/{new_tokens}'} |"
        )
    add("")
    add("### DINOv2-S: one forward pass at 1025 tokens (448 px: 32 x 32 patches + CLS)")
    add("")
    add("| engine | precision | devices | link | forward ms, wall | forward ms, CPU |")
    add("|---|---|---|---|---|---|")
    for row in out["dinov2"]["rows"]:
        wall = fmt_reps(row["ms_median"], row["ms_repeats"]) if row["clock"] == "wall" else "-"
        cpu = fmt_reps(row.get("cpu_ms_median"), row.get("cpu_ms_repeats"))
        if row["clock"] == "cpu":
            cpu = fmt_reps(row["ms_median"], row["ms_repeats"])
        add(
            f"| {row['engine']} | {row['precision']} | {row['devices']} | {row['link']} "
            f"| {wall} | {cpu} |"
        )
    add("")
    add(
        f"### Issue 12's goal: ASTRA's time to first token at N devices against 1/({EFFICIENCY} N) "
        "of the best single device"
    )
    add("")
    add(
        "Target = best single-device median / (0.9 N), on the ASTRA row's own clock (wall for "
        "processes, CPU for composed): the best engine of the same precision class (fp32: F32 "
        "GGUF, transformers, Astra; bf16: BF16 GGUF, transformers, Astra) and the best of any "
        "engine and precision (llama.cpp's Q4_1 included). ASTRA / target below 1.00 meets it."
    )
    add("")
    add(
        "| model | ASTRA | link | clock | ASTRA ms | best single, same precision | target ms "
        "| ASTRA / target | best single, any | target ms | ASTRA / target |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for g in out["goal"]:
        s, a = g["best_same_precision"], g["best_any"]
        add(
            f"| {g['model']} | {g['astra']} | {g['link']} | {g['clock']} | {fmt_ms(g['astra_ms'])} "
            f"| {s['engine']}: {fmt_ms(s['ms'])} | {fmt_ms(s['target_ms'])} "
            f"| {s['astra_over_target']:.2f} | {a['engine']}: {fmt_ms(a['ms'])} "
            f"| {fmt_ms(a['target_ms'])} | {a['astra_over_target']:.2f} |"
        )
    if out.get("errors"):
        add("")
        add("Failures in this run:")
        for k, v in out["errors"].items():
            add(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--build", type=Path, default=None, help="llama-cpp-python build folder")
    ap.add_argument("--command", default="bash benchmarks/peers.sh")
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args()
    raw = args.results / "raw"
    errors: dict[str, str] = {}

    prepared = load(raw / "prepared.json") or {}
    lcpp = load(raw / "llamacpp.json")
    ort = load(raw / "ort.json")
    hf = load(raw / "hf.json")
    benches = astra_benches(args.results / "astra")
    runs = astra_runs(args.results / "astra")
    repeats = (hf or lcpp or {}).get("repeats") or 3
    new_tokens = prepared.get("new_tokens", 32)

    import torch

    versions = {}
    if lcpp:
        versions["llama.cpp"] = lcpp["version"]
    if ort:
        versions["onnxruntime"] = ort["version"]
    if hf:
        versions["transformers"] = hf["version"]
    versions["Astra"] = f"torch {torch.__version__}"
    if (raw / "llamacpp_error.txt").exists():
        errors["llama.cpp bench"] = " / ".join((raw / "llamacpp_error.txt").read_text().split("\n"))

    build_info: dict = {}
    if args.build and args.build.is_dir():
        build_info["folder"] = str(args.build)
        if (args.build / "cmake_args.txt").exists():
            build_info["cmake_args"] = (args.build / "cmake_args.txt").read_text().strip()
        wheels = sorted(args.build.glob("*.whl"))
        build_info["status"] = f"built wheel {wheels[0].name}" if wheels else "FAILED"
        if (args.build / "build_seconds.txt").exists():
            build_info["build_seconds"] = int((args.build / "build_seconds.txt").read_text())
        if not wheels and (args.build / "build.log").exists():
            tail = (args.build / "build.log").read_text().splitlines()[-20:]
            build_info["log_tail"] = tail
            errors["llama.cpp build"] = " / ".join(tail[-3:])
    if lcpp:
        build_info["system_info"] = lcpp.get("system_info", "").strip()

    # ---- SmolLM2
    ref_ids = (hf or {}).get("smollm2", {}).get("float32", {}).get("generated_ids")
    srows: list[dict] = []
    if lcpp:
        for quant, label in (("q4_1", "Q4_1 GGUF"), ("f32", "F32 GGUF"), ("bf16", "BF16 GGUF")):
            cands = [v for v in lcpp["results"].values() if v["gguf"] == quant]
            if not cands:
                continue
            best = min(cands, key=lambda v: v["prefill_ms_median"])  # flash attention on/off
            other = [v for v in cands if v is not best]
            engine = f"llama.cpp, flash attn {'on' if best['flash_attn'] else 'off'}"
            if other:
                o = other[0]
                engine += (
                    f" (FA {'on' if o['flash_attn'] else 'off'}: {fmt_ms(o['prefill_ms_median'])}"
                    f" ms, {fmt_ms(o['tpot_ms_median'], 1)} ms/token)"
                )
            row = peer_row(engine, label, best, "prefill", ref_ids)
            row["flash_attn_other"] = other[0] if other else None
            srows.append(row)
        for k, v in lcpp.get("errors", {}).items():
            errors[f"llama.cpp {k}"] = v if isinstance(v, str) else " / ".join(v)
    if hf:
        for dt, v in hf["smollm2"].items():
            srows.append(peer_row("transformers (SDPA)", dt, v, "prefill", ref_ids))
    else:
        errors["transformers"] = "no result"
    srows += astra_rows("smollm2-135m", benches, runs, ref_ids)

    # ---- DINOv2
    drows: list[dict] = []
    if ort and "forward_ms_median" in ort:
        row = peer_row("onnxruntime (ORT_ENABLE_ALL)", "float32", ort, "forward", None)
        row["max_abs_diff_vs_transformers_fp32"] = ort["max_abs_diff_vs_transformers_fp32"]
        drows.append(row)
    else:
        errors["onnxruntime"] = (ort or {}).get("error", "no result")
    if hf:
        for dt, v in hf["dinov2"].items():
            drows.append(peer_row("transformers (SDPA)", dt, v, "forward", None))
    drows += astra_rows("dinov2-s", benches, runs, None)
    for b in benches:
        if "skipped" in b:
            errors[f"astra bench {b['run']}"] = str(b["skipped"])

    def load_text(name: str) -> list[str]:
        path = raw / name
        return path.read_text().strip().splitlines() if path.exists() else []

    before, after = load_text("uptime_before.txt"), load_text("uptime_after.txt")
    prov = provenance(["peers.sh"])
    prov["command"] = args.command
    out = {
        "command": args.command,
        "provenance": prov,
        "threads_note": (
            "llama.cpp n_threads = n_threads_batch = 1; transformers torch.set_num_threads(1); "
            "onnxruntime intra_op = inter_op = 1, sequential; Astra one thread per device "
            "(processes: one process per device; composed: each device's compute timed on one "
            "core); OMP_NUM_THREADS=1 for every process"
        ),
        "machine_load": {
            "uptime_before": before[0].strip() if before else None,
            "uptime_after": after[0].strip() if after else None,
            "before": before,
            "after": after,
        },
        "astra_commands": load_text("astra_commands.txt"),
        "versions": versions,
        "llama_cpp_build": build_info,
        "repeats": repeats,
        "new_tokens": new_tokens,
        "prepared": prepared,
        "smollm2": {"prompt_tokens": 1024, "rows": srows},
        "dinov2": {"tokens": 1025, "image_px": 448, "rows": drows},
        "goal": goal_rows("SmolLM2-135M", srows) + goal_rows("DINOv2-S", drows),
        "raw": {
            "llamacpp": lcpp,
            "onnxruntime": ort,
            "transformers": hf,
            "astra_bench": benches,
            "astra_run": runs,
        },
        "errors": errors,
    }
    write_json(args.results / "peers.json", out)

    body = markdown(out)
    notes = "<!-- notes -->\n(reading of the numbers: to be written after a run)\n<!-- /notes -->\n"
    if args.md.exists():
        m = re.search(r"<!-- notes -->.*?<!-- /notes -->\n?", args.md.read_text(), re.S)
        if m:
            notes = m.group(0)
    header = (
        "# Peers side by side: llama.cpp, onnxruntime, transformers and Astra"
        " (issue 12, item 4)\n\n"
        "One command, `bash benchmarks/peers.sh`, builds the peers' environment (.venv-peers, "
        "pinned in benchmarks/peers/requirements.txt; llama-cpp-python built from its sdist "
        "into a cached wheel), prepares the inputs and model files "
        "(benchmarks/peers/prepare.py), runs every engine at one thread and writes "
        "benchmarks/results/peers/peers.json and this file. Astra's rows come from `astra "
        "bench` (prefill, interleaved repeats) and `astra run` (decoding); their outputs are "
        "under benchmarks/results/peers/astra/.\n\n"
    )
    write_text(args.md, header + notes + "\n## The run\n\n" + body)
    print(body)


if __name__ == "__main__":
    main()
