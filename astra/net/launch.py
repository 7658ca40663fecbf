"""Start ranks: N local worker processes (spawn), or one rank under torchrun (init_from_env).

This is the only place that calls init_process_group; the group it makes is passed to the
worker function, which hands it to a Communicator.

Local groups listen on loopback only: rank 0's rendezvous store on a socket bound to 127.0.0.1
(torch's own TCPStore would listen on every interface) and gloo/NCCL on the loopback interface.
Every group, local or under torchrun, then passes astra.net.auth's HMAC challenge before any
work, so a process that does not hold the group's secret is refused.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from astra.net.auth import authenticate, new_secret, secret_from_env


class WorkerFailure(RuntimeError):
    """A spawned rank raised, died, or the job ran past its overall timeout."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank  # the rank that failed first (None for an overall timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS may still hand it out again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    """ "auto" -> "nccl" when CUDA is available, else "gloo"; other names pass through."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'auto', got {backend!r}")
    return backend


def _worker(
    rank: int,
    world_size: int,
    fn: Callable,
    args: tuple,
    threads_per_worker: int,
    backend: str,
    port: int,
    collective_timeout_s: float,
    secret: bytes,
    results: Any,
) -> None:
    try:
        _join_local_group(
            rank, world_size, threads_per_worker, backend, port, collective_timeout_s, secret
        )
        value = fn(rank, world_size, dist.group.WORLD, *args)
        # Pickled here with the plain pickler: tensors travel by value, not as shared-memory
        # handles that would die with this process. This is a local pipe to the parent that
        # started this process (same user, same machine), never a network peer: peers only
        # exchange tensors and JSON (astra.net.comm).
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit
        results.put((rank, False, describe_failure(exc)))
        results.close()
        results.join_thread()
        os._exit(1)  # skip destroy_process_group: peers may be stuck in a collective with us
    try:  # let every rank finish before tearing the group (and rank 0's store) down
        dist.barrier(group=dist.group.WORLD)
        dist.destroy_process_group()
    except Exception:
        pass  # results are already delivered; the parent only reaps the process


def _join_local_group(
    rank: int,
    world_size: int,
    threads: int,
    backend: str,
    port: int,
    timeout_s: float,
    secret: bytes,
) -> None:
    """This process becomes `rank` of a group whose store rank 0 serves on 127.0.0.1:port,
    and proves it holds `secret` (a fresh one per group, from the parent)."""
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # the transports' own listeners: on loopback, not on whatever the hostname resolves to
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = loopback_interface()
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        store=_loopback_store(rank, world_size, port, timeout),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    authenticate(dist.group.WORLD, rank, world_size, secret)


_listeners: list[socket.socket] = []  # rank 0's store socket lives as long as the process


def _loopback_store(rank: int, world_size: int, port: int, timeout: datetime.timedelta):
    """A TCPStore served on 127.0.0.1 only: rank 0 binds the socket itself and hands it to the
    store (master_listen_fd), instead of the store's default of every interface (IPv6 "::")."""
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(max(64, world_size))
    _listeners.append(listener)
    return dist.TCPStore(
        "127.0.0.1", port, world_size, True, timeout, master_listen_fd=listener.fileno()
    )


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS and the BSDs)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def _resident(
    rank: int,
    world_size: int,
    fn: Callable,
    args: tuple,
    threads: int,
    backend: str,
    port: int,
    collective_timeout_s: float,
    secret: bytes,
) -> None:
    try:
        _join_local_group(rank, world_size, threads, backend, port, collective_timeout_s, secret)
        fn(rank, world_size, dist.group.WORLD, *args)
    except KeyboardInterrupt:
        os._exit(130)  # the parent owns the terminal and reports; leave without a traceback
    except BaseException as exc:  # e.g. refused at rendezvous: one line (the parent names us)
        print(f"astra: device {rank}: {describe_failure(exc)}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)  # skip destroy_process_group: the parent ends the group, peers may be gone


def start_ranks(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    threads_per_worker: int = 1,
    backend: str = "gloo",
    collective_timeout_s: float = 60.0,
    start_method: str = "auto",
) -> list:
    """Start fn(rank, world_size, group, *args) in world_size local processes and return them
    at once (a persistent group: fn loops on its own inbox; see astra.group). The caller owns
    the processes: it watches them and ends them with `stop_ranks`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = _context(start_method)
    setup = (fn, args, threads_per_worker, resolve_backend(backend), free_port())
    setup += (collective_timeout_s, new_secret())
    return _start(ctx, _resident, "astra-device", world_size, setup)


def stop_ranks(procs: list, grace_s: float = 2.0) -> None:
    """End processes started by start_ranks: wait up to grace_s, then terminate, then kill
    (a stopped process ignores SIGTERM until it is continued; SIGKILL ends it anyway)."""
    _reap(procs, grace_s)


def mp_context(start_method: str = "auto"):
    """The multiprocessing context workers are started with (for their queues and shared
    values)."""
    return _context(start_method)


def spawn(
    fn: Callable,
    world_size: int,
    args: tuple = (),
    threads_per_worker: int = 1,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    port: int | None = None,
    collective_timeout_s: float | None = None,
    start_method: str = "auto",
) -> list:
    """Run fn(rank, world_size, group, *args) in world_size local processes; return the results.

    fn must be importable (module level) and return something picklable. If any rank raises or
    dies, the others are terminated and WorkerFailure names the rank and its error; the whole job
    is bounded by timeout_s. collective_timeout_s (default: timeout_s) is the process group's
    timeout, so a stuck collective fails inside the worker with a message of its own.

    start_method "auto" is forkserver with torch preloaded where the OS has it (Linux, macOS),
    else spawn: workers then fork from a server that imported torch once, so a launch costs
    about 0.15 s instead of 5-8 s (2 busy cores; every spawned worker re-imports torch). Both
    start clean processes (no state of the caller is inherited, CUDA is never initialised in
    the server); "spawn" forces the plain method.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = resolve_backend(backend)
    port = port if port is not None else free_port()
    collective_timeout_s = collective_timeout_s if collective_timeout_s is not None else timeout_s
    ctx = _context(start_method)
    results = ctx.Queue()
    setup = (fn, args, threads_per_worker, backend, port, collective_timeout_s, new_secret())
    setup += (results,)
    procs = _start(ctx, _worker, "astra-rank", world_size, setup)
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) < world_size and not errors:
            try:
                rank, ok, payload = results.get(timeout=0.1)
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank not in values and p.exitcode is not None:
                        _drain(results, values, errors, wait_s=1.0)  # its last words in flight?
                        if rank not in values and rank not in errors:
                            errors[rank] = (
                                f"process exited with code {p.exitcode} without returning a result"
                            )
                        break
                if not errors and time.monotonic() > deadline:
                    pending = [r for r in range(world_size) if r not in values]
                    raise WorkerFailure(
                        f"spawn of {world_size} ranks timed out after {timeout_s:g}s; "
                        f"ranks {pending} had not finished"
                    ) from None
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
        if errors:
            # Peers of a failed rank fail soon after (connection closed); collect them briefly so
            # the root cause, not a follow-on PeerFailure, is reported first.
            _drain(results, values, errors, wait_s=1.0)
            for rank, p in enumerate(procs):  # a rank that died silently is the likely cause
                if rank not in values and rank not in errors and p.exitcode is not None:
                    errors[rank] = (
                        f"process exited with code {p.exitcode} without returning a result"
                    )
            frozen = [r for r, p in enumerate(procs) if process_state(p.pid).startswith("stopped")]
            for rank in frozen:  # its peers' collectives timed out waiting: it is the cause
                errors[rank] = (
                    f"stopped answering (pid {procs[rank].pid}, {process_state(procs[rank].pid)}); "
                    f"its peers gave up after --peer-timeout {collective_timeout_s:g} s"
                )
            first = min(errors, key=lambda r: (r not in frozen, "PeerFailure" in errors[r], r))
            # one line: the cause, then who went down with it (their errors are consequences)
            others = [r for r in sorted(errors) if r != first]
            also = f" (then devices {others} stopped with it)" if others else ""
            cause, _, trace = errors[first].partition("\n")
            raise WorkerFailure(
                f"device {first} failed: {cause}{also}" + (f"\n{trace}" if trace else ""),
                rank=first,
            )
        return [values[r] for r in range(world_size)]
    finally:
        _reap(procs, grace_s=10.0 if len(values) == world_size else 0.0)
        results.close()


def process_state(pid: int) -> str:
    """ "stopped (SIGSTOP)" or "" from /proc (Linux); a frozen process is worth naming."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {"T": "stopped (SIGSTOP)", "t": "stopped by a debugger", "Z": "a zombie"}.get(state, "")


def describe_failure(exc: BaseException) -> str:
    """A worker's failure as the one line a user sees ("ValueError: ..."); with ASTRA_DEBUG=1
    in the environment, followed by the worker's traceback."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
    if os.environ.get("ASTRA_DEBUG"):
        line += "\n" + traceback.format_exc()
    return line


def _start(ctx, target: Callable, name: str, world_size: int, setup: tuple) -> list:
    """world_size daemon processes running target(rank, world_size, *setup), started."""
    procs = [
        ctx.Process(
            target=target, daemon=True, name=f"{name}{rank}", args=(rank, world_size, *setup)
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    return procs


def _context(start_method: str):
    if start_method == "auto":
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(
            f"start_method must be 'auto', 'forkserver' or 'spawn', got {start_method!r}"
        )
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed"])  # no effect once it runs
    return ctx


def _drain(results: Any, values: dict, errors: dict, wait_s: float) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            rank, ok, payload = results.get(timeout=max(0.01, end - time.monotonic()))
        except queue.Empty:
            return
        if ok:
            values[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload


def _reap(procs: list, grace_s: float) -> None:
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)


def init_from_env(
    backend: str = "auto", timeout_s: float = 60.0
) -> tuple[int, int, dist.ProcessGroup]:
    """Join the group described by torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Returns (rank, world_size, group). With nccl, the CUDA device is LOCAL_RANK. Every rank
    must hold the same secret (ASTRA_SECRET_FILE or ASTRA_SECRET; astra.net.auth); it is read
    before joining, so a missing one costs one line, not a rendezvous.
    """
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_from_env needs {missing} in the environment (run under torchrun)")
    secret = secret_from_env()
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    authenticate(dist.group.WORLD, rank, world_size, secret)
    return rank, world_size, dist.group.WORLD


def rank0_logger(rank: int, name: str = "astra") -> logging.Logger:
    """A logger that prints on rank 0 (INFO and up, "[rank0]" prefix) and is silent elsewhere."""
    logger = logging.getLogger(f"{name}.rank{rank}")
    if not logger.handlers:
        if rank == 0:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[rank0] %(asctime)s %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        else:
            logger.addHandler(logging.NullHandler())
            logger.setLevel(logging.CRITICAL + 1)
        logger.propagate = False
    return logger
