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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
