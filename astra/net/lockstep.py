"""Composed mode: N devices on fewer cores, each device's compute measured for real.

Every rank runs the *same* per-rank code as a real run, in its own thread, but only one rank
computes at a time (a baton passes between them at communication points), so each compute
segment is timed on one core, undisturbed. Each rank keeps a virtual clock: compute segments
advance it by their measured duration; a message sent at virtual time t arrives at
t + latency + bytes*8/bandwidth (the same link model and uplink queueing as the real
Communicator); a wait moves the clock to the latest arrival. The pass ends at the largest
virtual clock: the critical path of N truly parallel devices on that link.

Compute segments are timed as the worker thread's CPU time (time.thread_time): with one
intra-op thread per device that equals the wall time on an idle core, and unlike wall time it
does not grow when other programs share the machine, so composed numbers are repeatable.

Heterogeneous devices (paper App. D; `speeds`): a device of relative speed s is charged
elapsed / s for every compute segment it runs (speed 0.5: twice its measured time). This is
exactly a device that does the same work s times as fast, in every stage alike (linear layers,
attention, the code search); a real slower CPU would differ in its cache and memory-bandwidth
balance, which a uniform factor does not capture.

What it does not model: contention between devices for memory bandwidth (each segment runs
alone), and real transport overheads (serialisation, TCP). tests/test_lockstep.py holds it
against real 2-process runs.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from astra.net.comm import CommStats, PeerFailure, as_bytes, from_bytes
from astra.net.link import LinkConfig, Uplink
from astra.parallel.placement import check_device_speeds


@dataclass
class _Message:
    payload: torch.Tensor
    send_s: float  # virtual time the sender's uplink started pushing it


@dataclass
class _Collective:
    op: str
    messages: dict[int, _Message] = field(default_factory=dict)


class LockstepGroup:
    """Shared state of N lockstep ranks: the baton, virtual clocks, messages in flight."""

    def __init__(
        self,
        world_size: int,
        link: LinkConfig,
        timeout_s: float = 600.0,
        speeds: tuple[float, ...] | None = None,
    ):
        self.world_size = world_size
        # relative speed of each device: its measured compute is charged / speed
        self.speeds = (
            check_device_speeds(speeds, world_size) if speeds is not None else (1.0,) * world_size
        )
        self.link = link
        self.timeout_s = timeout_s
        self.cond = threading.Condition()
        self.turn = 0
        self.done: set[int] = set()
        self.failed: BaseException | None = None
        self.clock_s = [0.0] * world_size  # virtual time of each rank
        self.compute_s = [0.0] * world_size
        self.collectives: dict[int, _Collective] = {}
        self.mailboxes: dict[tuple[int, int], list[_Message]] = {}
        self._idle_passes = 0

    # -- the baton ------------------------------------------------------------------------
    def wait_turn(self, rank: int) -> None:
        with self.cond:
            deadline = time.monotonic() + self.timeout_s
            while self.turn != rank and self.failed is None:
                if not self.cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise PeerFailure(f"lockstep rank {rank}: no turn within {self.timeout_s}s")
            if self.failed is not None:
                raise PeerFailure(f"lockstep rank {rank}: another rank failed: {self.failed}")

    def pass_turn(self, rank: int, progressed: bool) -> None:
        with self.cond:
            self._idle_passes = 0 if progressed else self._idle_passes + 1
            if self._idle_passes > 2 * self.world_size:
                self.failed = PeerFailure("lockstep deadlock: every rank waits for another")
                self.cond.notify_all()
                raise self.failed
            live = [r for r in range(self.world_size) if r not in self.done]
            if live:
                later = [r for r in live if r > rank]
                self.turn = later[0] if later else live[0]
            self.cond.notify_all()

    def finish(self, rank: int, error: BaseException | None = None) -> None:
        with self.cond:
            self._idle_passes = 0
            self.done.add(rank)
            if error is not None and self.failed is None:
                self.failed = error
            live = [r for r in range(self.world_size) if r not in self.done]
            if live:
                later = [r for r in live if r > rank]
                self.turn = later[0] if later else live[0]
            self.cond.notify_all()


class _Handle:
    def __init__(self, comm: LockstepComm, seq: int):
        self._comm, self._seq = comm, seq
        self._result: list[torch.Tensor] | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            self._result = self._comm._finish_all_gather(self._seq)
        return self._result


class LockstepComm:
    """The Communicator interface (astra.net.comm) for one rank of a LockstepGroup."""

    def __init__(self, group: LockstepGroup, rank: int):
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self.uplink = Uplink(group.link)
        self.stats = CommStats()
        self._seq = 0
        self._segment_start = time.thread_time()

    # -- virtual time -----------------------------------------------------------------------
    def begin(self) -> None:
        """Called by the rank's thread once it holds the baton for the first time."""
        self._segment_start = time.thread_time()

    def _charge_compute(self) -> None:
        # measured on this core, then scaled to this device's speed (App. D heterogeneity)
        elapsed = (time.thread_time() - self._segment_start) / self.group.speeds[self.rank]
        self.group.clock_s[self.rank] += elapsed
        self.group.compute_s[self.rank] += elapsed

    def _resume(self) -> None:
        self._segment_start = time.thread_time()

    def _block_until(self, ready) -> None:
        """Hand the baton round until `ready()`; compute of other ranks runs meanwhile."""
        progressed = True  # we computed since we got the baton
        while not ready():
            self.group.pass_turn(self.rank, progressed)
            self.group.wait_turn(self.rank)
            progressed = False  # woke up only to find we still cannot go on

    @property
    def link(self) -> LinkConfig:
        return self.uplink.link

    @link.setter
    def link(self, link: LinkConfig) -> None:
        self.uplink.link = link

    def _reserve_uplink(self, num_bytes_on_wire: float) -> float:
        return self.uplink.reserve(self.group.clock_s[self.rank], num_bytes_on_wire)

    def _advance_to(self, arrival_s: float) -> float:
        clock = self.group.clock_s
        waited = max(0.0, arrival_s - clock[self.rank])
        clock[self.rank] += waited
        return waited

    # -- collectives -------------------------------------------------------------------------
    def start_all_gather_bytes(self, payload: torch.Tensor, op: str = "all_gather") -> _Handle:
        self._charge_compute()
        self._seq += 1
        n = self.world_size
        sent = payload.numel() * (2 * (n - 1) / n if op == "all_reduce" else n - 1)
        send_s = self._reserve_uplink(sent)
        coll = self.group.collectives.setdefault(self._seq, _Collective(op))
        coll.messages[self.rank] = _Message(payload.clone(), send_s)
        self.stats.add(num_messages=1, bytes_sent=int(round(sent)))
        self._resume()
        return _Handle(self, self._seq)

    def _finish_all_gather(self, seq: int) -> list[torch.Tensor]:
        self._charge_compute()
        coll = self.group.collectives[seq]
        self._block_until(lambda: len(coll.messages) == self.world_size)
        n = self.world_size
        arrivals = []
        for j, msg in coll.messages.items():
            if j == self.rank:
                continue
            op = "all_reduce" if coll.op == "all_reduce" else "all_gather"
            arrivals.append(self.uplink.arrival_s(msg.send_s, msg.payload.numel(), op, n))
        waited = self._advance_to(max(arrivals, default=0.0))
        received = sum(m.payload.numel() for j, m in coll.messages.items() if j != self.rank)
        if coll.op == "all_reduce":
            received = received * 2 / n
        self.stats.add(
            comm_ms=waited * 1e3,
            wait_ms=waited * 1e3,
            emulated_ms=waited * 1e3,
            bytes_received=int(round(received)),
        )
        out = [coll.messages[j].payload for j in range(n)]
        self._resume()
        return out

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        return self.start_all_gather_bytes(payload).wait()

    def all_gather_tensor(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        shape = list(x.shape)
        dim = dim % len(shape)
        row_bytes = x.element_size() * math.prod(shape[:dim] + shape[dim + 1 :])
        out = []
        for part in self.all_gather_bytes(as_bytes(x)):
            shape[dim] = part.numel() // row_bytes
            out.append(from_bytes(part, x.dtype, list(shape), x.device))
        return out

    def all_reduce_tensor(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.start_all_gather_bytes(as_bytes(x), op="all_reduce").wait()
        total = from_bytes(parts[0], x.dtype, list(x.shape), x.device).clone()
        for part in parts[1:]:
            total += from_bytes(part, x.dtype, list(x.shape), x.device)
        return total

    def send_tensor(self, x: torch.Tensor, dst: int) -> None:
        self._charge_compute()
        payload = as_bytes(x).clone()
        send_s = self._reserve_uplink(payload.numel())
        box = self.group.mailboxes.setdefault((self.rank, dst), [])
        box.append(_Message(x.detach().clone(), send_s))
        self.stats.add(num_messages=1, bytes_sent=payload.numel())
        self._resume()

    def expect(self, src: int) -> None:
        """Nothing to post: the virtual link delivers into a mailbox."""

    def recv_tensor(self, src: int) -> torch.Tensor:
        self._charge_compute()
        box = self.group.mailboxes.setdefault((src, self.rank), [])
        self._block_until(lambda: len(box) > 0)
        msg = box.pop(0)
        num_bytes = msg.payload.numel() * msg.payload.element_size()
        waited = self._advance_to(self.uplink.arrival_s(msg.send_s, num_bytes, "p2p", 2))
        self.stats.add(
            comm_ms=waited * 1e3,
            wait_ms=waited * 1e3,
            emulated_ms=waited * 1e3,
            num_messages=1,
            bytes_received=num_bytes,
        )
        self._resume()
        return msg.payload

    def barrier(self) -> None:
        """All ranks meet; clocks move to the latest one (control traffic, not charged)."""
        self._charge_compute()
        self._seq += 1
        coll = self.group.collectives.setdefault(self._seq, _Collective("barrier"))
        coll.messages[self.rank] = _Message(
            torch.zeros(0, dtype=torch.uint8), self.group.clock_s[self.rank]
        )
        self._block_until(lambda: len(coll.messages) == self.world_size)
        self._advance_to(max(m.send_s for m in coll.messages.values()))
        self._resume()

    def now(self) -> float:
        """This rank's virtual time in seconds (compute so far charged)."""
        self._charge_compute()
        self._resume()
        return self.group.clock_s[self.rank]

    def wait_sends(self) -> None:
        """Sends are delivered by the shared mailboxes; nothing to flush."""


def share_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers are the same tensors.

    Each lockstep rank swaps its own attention wrappers in; the weights stay shared (read-only).
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def run_lockstep(
    fn,
    world_size: int,
    link: LinkConfig,
    args=(),
    timeout_s: float = 600.0,
    speeds: tuple[float, ...] | None = None,
):
    """Run fn(rank, world_size, comm, *args) for every rank in lockstep threads.

    Returns (results per rank, virtual end time per rank in s, compute per rank in s: measured,
    divided by the rank's relative speed when `speeds` is given).
    torch uses one intra-op thread here so that a segment's time is one core's time.
    """
    group = LockstepGroup(world_size, link, timeout_s, speeds)
    results: list = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size

    def worker(rank: int) -> None:
        # intra-op thread count is per OS thread (OpenMP): set it in every worker thread
        torch.set_num_threads(1)
        comm = LockstepComm(group, rank)
        try:
            group.wait_turn(rank)
            comm.begin()
            results[rank] = fn(rank, world_size, comm, *args)
            comm._charge_compute()
            group.finish(rank)
        except BaseException as exc:  # hand the failure to the caller, wake the others
            errors[rank] = exc
            group.finish(rank, exc)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        threads = [
            threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
            if t.is_alive():
                raise PeerFailure(f"lockstep run did not finish within {timeout_s}s")
    finally:
        torch.set_num_threads(previous_threads)
    for rank, err in enumerate(errors):
        if err is not None and not isinstance(err, PeerFailure):
            raise RuntimeError(f"lockstep rank {rank} failed: {err!r}") from err
    for err in errors:
        if err is not None:
            raise err
    return results, list(group.clock_s), list(group.compute_s)
