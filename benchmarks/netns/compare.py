#!/usr/bin/env python3
"""Real shaped link vs Astra's emulated link, side by side (issue 14 item 6).

For every cell of the grid (devices x rate x one-way delay) and every repeat, in an interleaved
order (the variants' order rotates with the repeat), runs:

  real       benchmarks/netns/testbed.sh: one rank per network namespace, tbf-shaped uplinks,
             NFQUEUE delay (delay.py), Astra with --bandwidth inf --latency 0 over real gloo/TCP
  emulated   the same `astra run` ranks as local processes over loopback (torchrun environment,
             the same code path: runner.run_torchrun), with --bandwidth R --latency D
  corrected  as emulated, through corrected_link.py (the link model corrected for gloo's
             receive rendezvous and TCP framing; a proposal, astra/ is not edited)
  processes  `astra run --mode processes` (the warm device group, astra.group) with the link
             emulated: what `astra run`/`astra bench` users run

and, with --probe, the same three link variants for linkprobe.py (single messages through the
Communicator, no model: the link model alone). Writes benchmarks/results/netns/compare.json
(every run, medians, the environment, the command) and compare.md (the tables), atomically.

Needs root for the real variant (namespaces, tc, iptables); without root it prints the testbed's
"skipped" line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = os.environ.get("ASTRA_PY", str(ROOT / ".venv" / "bin" / "python"))
TESTBED = HERE / "testbed.sh"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def environment() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch_version = sh([PY, "-c", "import torch; print(torch.__version__)"])
    nfq = sh([PY, "-c", "import netfilterqueue as n; print(n.VERSION)"])
    return {
        "git_commit": sh(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty_files": [
            line[3:]
            for line in sh(["git", "status", "--porcelain"]).splitlines()
            if line[3:].startswith(("astra/", "pyproject"))
        ],
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "torch": torch_version,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "tcp_congestion_control": sh(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]),
        "tcp_slow_start_after_idle": sh(["sysctl", "-n", "net.ipv4.tcp_slow_start_after_idle"]),
        "netfilterqueue": nfq,
    }


class Runner:
    """Runs one variant of one cell and returns what it measured (or an error)."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.count = 0

    def astra_args(self, devices: int, bandwidth: str, latency: str, out: Path) -> list[str]:
        a = self.args
        return [
            "run",
            "--model",
            a.model,
            "--methods",
            "astra",
            "--tokens",
            str(a.tokens),
            "--new-tokens",
            "1",
            "--devices",
            str(devices),
            "--bandwidth",
            bandwidth,
            "--latency",
            latency,
            "--peer-timeout",
            "120",
            "--json",
            str(out),
        ]

    def probe_args(self, bandwidth: str, latency: str, out: Path, corrected: bool) -> list[str]:
        a = self.args
        cmd = [
            str(HERE / "linkprobe.py"),
            "--bandwidth",
            bandwidth,
            "--latency",
            latency,
            "--sizes",
            a.probe_sizes,
            "--repeats",
            str(a.probe_repeats),
            "--gap",
            str(a.probe_gap),
            "--json",
            str(out),
        ]
        return cmd + (["--corrected"] if corrected else [])

    def run(self, kind: str, variant: str, devices: int, rate: str, delay_ms: float) -> dict:
        self.count += 1
        d = self.scratch / f"{self.count:03d}-{kind}-{variant}-{devices}dev-{rate}-{delay_ms:g}ms"
        d.mkdir(parents=True)
        out = d / "result.json"
        latency = f"{delay_ms:g}ms" if delay_ms else "0"
        if kind == "astra":
            real_cmd = [str(ROOT / ".venv" / "bin" / "astra")] + self.astra_args(
                devices, "inf", "0", out
            )
            emu_cmd = [str(ROOT / ".venv" / "bin" / "astra")] + self.astra_args(
                devices, rate, latency, out
            )
            corr_cmd = [PY, str(HERE / "corrected_link.py")] + self.astra_args(
                devices, rate, latency, out
            )
        else:
            real_cmd = [PY] + self.probe_args("inf", "0", out, False)
            emu_cmd = [PY] + self.probe_args(rate, latency, out, False)
            corr_cmd = [PY] + self.probe_args(rate, latency, out, True)
        t0 = time.perf_counter()
        if variant == "real":
            cmd = [
                "bash",
                str(TESTBED),
                "--devices",
                str(devices),
                "--rate",
                rate,
                "--delay-ms",
                f"{delay_ms:g}",
                "--out",
                str(d),
                "--timeout",
                str(self.args.run_timeout),
                "--",
                *real_cmd,
            ]
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=open(d / "testbed.log", "w"), stderr=subprocess.STDOUT
            ).returncode
        elif variant in ("emulated", "corrected"):
            rc = self.local_ranks(emu_cmd if variant == "emulated" else corr_cmd, devices, d)
        elif variant == "processes":
            cmd = (
                [str(ROOT / ".venv" / "bin" / "astra")]
                + self.astra_args(devices, rate, latency, out)
                + ["--mode", "processes"]
            )
            rc = subprocess.run(
                cmd,
                cwd=ROOT,
                stdout=open(d / "rank0.log", "w"),
                stderr=subprocess.STDOUT,
                timeout=self.args.run_timeout,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            ).returncode
        else:
            raise ValueError(variant)
        wall = time.perf_counter() - t0
        rec: dict = {
            "kind": kind,
            "variant": variant,
            "devices": devices,
            "rate": rate,
            "delay_ms": delay_ms,
            "rc": rc,
            "wall_s": round(wall, 1),
            "dir": str(d),
        }
        if rc != 0 or not out.exists():
            log = d / "rank0.log"
            tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
            rec["error"] = " | ".join(tail) or f"exit {rc}"
            return rec
        data = json.loads(out.read_text())
        if kind == "astra":
            r = data["records"][0]
            rec.update(
                ttft_ms=r["ttft_ms"],
                compute_ms_max=max(r["compute_ms_per_device"]),
                wait_ms_max=max(r["wait_ms_per_device"]),
                bytes_sent_per_device=r["bytes_sent_per_device"],
                completion=r.get("completion"),
            )
        else:
            rec["probe_ms"] = data["median_ms"]
        tb = d / "testbed.json"
        if tb.exists():
            t = json.loads(tb.read_text())
            rec["wire_tx_bytes_per_device"] = [w["tx_bytes"] for w in t["wire"]]
            rec["wire_tx_packets_per_device"] = [w["tx_packets"] for w in t["wire"]]
            rec["delay_daemons"] = t["delay_daemons"]
        return rec

    def local_ranks(self, cmd: list[str], devices: int, d: Path) -> int:
        """N ranks as local processes over loopback, with the torchrun environment."""
        port = free_port()
        env = {
            **os.environ,
            "WORLD_SIZE": str(devices),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo",
            "ASTRA_SECRET": secrets.token_hex(16),
            "OMP_NUM_THREADS": "1",
        }
        procs = []
        try:
            for rank in range(devices):
                log = open(d / f"rank{rank}.log", "w")
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=ROOT,
                        env={**env, "RANK": str(rank)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            deadline = time.monotonic() + self.args.run_timeout
            rcs = []
            for p in procs:
                rcs.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            return max(abs(rc) for rc in rcs)
        except subprocess.TimeoutExpired:
            return 124
        finally:
            for p in procs:  # only the processes this function started, by their pid
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict], variants: list[str]) -> tuple[list[dict], list[dict]]:
    cells: dict = {}
    for r in runs:
        if "error" in r:
            continue
        key = (r["devices"], r["rate"], r["delay_ms"])
        if r["kind"] == "astra":
            c = cells.setdefault(key, {})
            c.setdefault(r["variant"], []).append(r)
    table = []
    for (devices, rate, delay), c in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])
    ):
        row = {"devices": devices, "rate": rate, "delay_ms": delay}
        for v in variants:
            rs = c.get(v, [])
            row[f"{v}_ttft_ms"] = median([x["ttft_ms"] for x in rs])
            row[f"{v}_wait_ms"] = median([x["wait_ms_max"] for x in rs])
            row[f"{v}_compute_ms"] = median([x["compute_ms_max"] for x in rs])
            row[f"{v}_n"] = len(rs)
            if v != "real" and rs and c.get("real"):
                ratio = row[f"{v}_ttft_ms"] / row["real_ttft_ms"]
                row[f"{v}_ratio"] = ratio
                row[f"{v}_within_10pct"] = abs(ratio - 1) <= 0.10
                # each repeat's runs are adjacent in time (same load on a shared machine):
                # the ratio within a repeat, then the median over repeats
                real_by_rep = {x["repeat"]: x for x in c["real"]}
                paired = [
                    x["ttft_ms"] / real_by_rep[x["repeat"]]["ttft_ms"]
                    for x in rs
                    if x["repeat"] in real_by_rep
                ]
                row[f"{v}_paired_ratios"] = paired
                row[f"{v}_paired_ratio"] = median(paired)
                row[f"{v}_ttft_ms_all"] = [x["ttft_ms"] for x in rs]
        if c.get("real"):
            row["real_ttft_ms_all"] = [x["ttft_ms"] for x in c["real"]]
        real = c.get("real", [])
        if real:
            row["payload_bytes_sent_per_device"] = real[0]["bytes_sent_per_device"]
            row["wire_bytes_whole_job_per_device"] = [
                int(statistics.median(x["wire_tx_bytes_per_device"][i] for x in real))
                for i in range(devices)
            ]
        table.append(row)
    probes: dict = {}
    for r in runs:
        if r["kind"] != "probe" or "error" in r:
            continue
        key = (r["devices"], r["rate"], r["delay_ms"])
        for msg, ms in r["probe_ms"].items():
            probes.setdefault(key + (msg,), {})[r["variant"]] = ms
    probe_table = []
    for (devices, rate, delay, msg), v in sorted(
        probes.items(),
        key=lambda kv: (
            kv[0][0],
            kv[0][1],
            kv[0][2],
            kv[0][3].split(":")[0],
            int(kv[0][3].split(":")[1]),
        ),
    ):
        row = {
            "devices": devices,
            "rate": rate,
            "delay_ms": delay,
            "message": msg,
            **{f"{k}_ms": x for k, x in v.items()},
        }
        for k in ("emulated", "corrected"):
            if k in v and "real" in v:
                row[f"{k}_ratio"] = v[k] / v["real"]
        probe_table.append(row)
    return table, probe_table


def fmt(x, spec=".0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(table: list[dict], probe_table: list[dict], variants: list[str]) -> str:
    lines = ["### End to end: `astra run --methods astra`, TTFT (median of repeats, ms)", ""]
    head = "| devices | rate | delay | real |"
    sep = "|---|---|---|---|"
    for v in variants:
        if v == "real":
            continue
        head += f" {v} | {v}/real | paired | within 10% |"
        sep += "---|---|---|---|"
    head += " payload B/dev | wire B/dev (whole job) |"
    sep += "---|---|"
    lines += [head, sep]
    for r in table:
        cell = f"| {r['devices']} | {r['rate']} | {r['delay_ms']:g} ms |"
        line = f"{cell} {fmt(r.get('real_ttft_ms'))} |"
        for v in variants:
            if v == "real":
                continue
            ok = r.get(f"{v}_within_10pct")
            pr = r.get(f"{v}_paired_ratio")
            pok = None if pr is None else abs(pr - 1) <= 0.10
            line += (
                f" {fmt(r.get(f'{v}_ttft_ms'))} | {fmt(r.get(f'{v}_ratio'), '.2f')} |"
                f" {fmt(pr, '.2f')} |"
                f" {'-' if ok is None else ('yes' if ok else '**no**')} /"
                f" {'-' if pok is None else ('yes' if pok else '**no**')} |"
            )
        line += (
            f" {r.get('payload_bytes_sent_per_device', '-')} |"
            f" {r.get('wire_bytes_whole_job_per_device', '-')} |"
        )
        lines.append(line)
    others = [v for v in variants if v != "real"]
    lines += [
        "",
        "### The link's share: the longest wait of any device (ms, median) and the slowest "
        "device's compute (ms, median)",
        "",
        "| devices | rate | delay | real wait | "
        + " | ".join(f"{v} wait | {v}/real" for v in others)
        + " | real compute | "
        + " | ".join(f"{v} compute" for v in others)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(others) + "---|" + "---|" * len(others),
    ]
    for r in table:
        cell = f"| {r['devices']} | {r['rate']} | {r['delay_ms']:g} ms |"
        line = f"{cell} {fmt(r.get('real_wait_ms'))} |"
        for v in others:
            w, rw = r.get(f"{v}_wait_ms"), r.get("real_wait_ms")
            ratio = w / rw if w is not None and rw else None
            line += f" {fmt(w)} | {fmt(ratio, '.2f')} |"
        line += f" {fmt(r.get('real_compute_ms'))} |"
        for v in others:
            line += f" {fmt(r.get(f'{v}_compute_ms'))} |"
        lines.append(line)
    if probe_table:
        lines += [
            "",
            "### Link alone: linkprobe.py, one message (median, ms)",
            "",
            "| devices | rate | delay | message (bytes) | real | emulated | emu/real | corrected "
            "| corr/real |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in probe_table:
            lines.append(
                f"| {r['devices']} | {r['rate']} | {r['delay_ms']:g} ms | {r['message']} |"
                f" {fmt(r.get('real_ms'), '.1f')} | {fmt(r.get('emulated_ms'), '.1f')} |"
                f" {fmt(r.get('emulated_ratio'), '.2f')} | {fmt(r.get('corrected_ms'), '.1f')} |"
                f" {fmt(r.get('corrected_ratio'), '.2f')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="2,4")
    p.add_argument("--rates", default="10mbit,100mbit")
    p.add_argument("--delays", default="0,20", help="one-way delays, ms")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="real,emulated,corrected")
    p.add_argument(
        "--corrected-delays",
        default="20",
        help="run the corrected variant only at these delays (ms); 'all' for every",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--probe", action="store_true", help="also run linkprobe.py per cell")
    p.add_argument("--no-astra", action="store_true", help="only the probe")
    p.add_argument("--probe-sizes", default="1280,16k,128k,1m")
    p.add_argument("--probe-repeats", type=int, default=3)
    p.add_argument("--probe-gap", type=float, default=0.3)
    p.add_argument("--run-timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "netns"))
    p.add_argument("--scratch", default=None, help="per-run logs (default: a temp directory)")
    p.add_argument(
        "--resummarize",
        default=None,
        metavar="COMPARE_JSON",
        help="rebuild the tables of an earlier compare.json (no runs)",
    )
    args = p.parse_args()
    if args.resummarize:
        path = Path(args.resummarize)
        doc = json.loads(path.read_text())
        variants = doc["settings"]["variants"].split(",")
        doc["table"], doc["probe_table"] = summarize(doc["runs"], variants)
        doc["markdown"] = markdown(doc["table"], doc["probe_table"], variants)
        atomic_write(path, json.dumps(doc, indent=1) + "\n")
        atomic_write(path.with_suffix(".md"), doc["markdown"])
        print(doc["markdown"])
        return 0
    if os.geteuid() != 0:
        print("skipped: needs root (network namespaces, tc, iptables)")
        return 0
    devices = [int(x) for x in args.devices.split(",")]
    rates = args.rates.split(",")
    delays = [float(x) for x in args.delays.split(",")]
    variants = args.variants.split(",")
    corr_delays = (
        None
        if args.corrected_delays == "all"
        else {float(x) for x in args.corrected_delays.split(",")}
    )
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="astra-netns-"))
    out_dir = Path(args.out)
    runner = Runner(args, scratch)
    env = environment()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    runs: list[dict] = []
    t_start = time.time()

    def save() -> None:
        table, probe_table = summarize(runs, variants)
        md = markdown(table, probe_table, variants)
        doc = {
            "command": command,
            "environment": env,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
            "elapsed_s": round(time.time() - t_start),
            "settings": vars(args),
            "table": table,
            "probe_table": probe_table,
            "markdown": md,
            "runs": runs,
        }
        atomic_write(out_dir / "compare.json", json.dumps(doc, indent=1) + "\n")
        atomic_write(out_dir / "compare.md", md)

    cells = [(n, r, dl) for n in devices for r in rates for dl in delays]
    kinds = (["probe"] if args.probe else []) + ([] if args.no_astra else ["astra"])
    try:
        for kind in kinds:
            reps = 1 if kind == "probe" else args.repeats  # the probe repeats inside itself
            for rep in range(reps):
                for n, rate, dl in cells:
                    order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
                    for v in order:
                        if v == "corrected" and corr_delays is not None and dl not in corr_delays:
                            continue
                        if v == "processes" and kind == "probe":
                            continue
                        rec = runner.run(kind, v, n, rate, dl)
                        rec["repeat"] = rep
                        runs.append(rec)
                        shown = rec.get("ttft_ms") or rec.get("probe_ms") or rec.get("error")
                        if isinstance(shown, dict):
                            shown = ", ".join(f"{k}={x:.0f}" for k, x in list(shown.items())[:4])
                        elif isinstance(shown, float):
                            shown = f"TTFT {shown:.0f} ms"
                        print(
                            f"[{time.time() - t_start:6.0f}s] {kind:5} {v:9} {n} dev {rate:>7} "
                            f"{dl:g} ms rep {rep}: {shown} ({rec['wall_s']} s)",
                            flush=True,
                        )
                        save()
    except KeyboardInterrupt:
        print("interrupted; partial results saved", file=sys.stderr)
        save()
        return 130
    save()
    print(markdown(*summarize(runs, variants), variants))
    print(f"wrote {out_dir / 'compare.json'} and compare.md; per-run logs in {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
