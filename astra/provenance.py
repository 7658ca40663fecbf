"""Where a number came from: recorded with every result Astra writes (bench, eval, run JSON).

A figure without its command, commit and machine cannot be checked or reproduced; these
machines are noisy and shared, so the CPU, its core count and the thread counts go along.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch


def provenance(command: list[str] | None = None) -> dict:
    """The command line, git commit (with a '+dirty' mark), CPU, cores, torch and threads."""
    argv = sys.argv if command is None else command
    return {
        "command": "astra " + " ".join(shlex.quote(a) for a in argv[1:]),
        "git_commit": git_commit(),
        "cpu": cpu_name(),
        # "AMD EPYC" names a Zen 1 with AVX2 and a Zen 4 with AVX-512 BF16 alike, whose GEMMs
        # differ 3x: the instruction sets that decide Astra's and the peers' kernels go along
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> str | None:
    """The checkout's short commit, '+dirty' when files differ from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


# the /proc/cpuinfo flags that pick the kernels (fp32 AVX2/AVX-512 GEMMs, bf16 and int8 paths)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_isa() -> dict:
    """What decides this CPU's speed beyond its name: PyTorch's kernel level ("AVX2",
    "AVX512", ...), the speed-relevant flags it has, and its family and model numbers."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
            if len(fields) == 3:
                break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
    }


def cpu_label(record: dict) -> str:
    """A provenance record's CPU in a few words: "AMD EPYC (AVX2, family 23 model 1)"."""
    isa = record.get("cpu_isa") or {}
    if not isa:
        return str(record.get("cpu", "unknown"))
    where = f", family {isa['family']} model {isa['model']}" if isa.get("family") else ""
    return f"{record.get('cpu', 'unknown')} ({isa.get('torch_capability')}{where})"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
