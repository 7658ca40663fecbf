"""Communicator: collectives over a torch.distributed group, with link emulation and accounting.

Maths code receives a Communicator and never touches torch.distributed. Every message carries a
small int64 header (operation, sequence number, payload size, send time) in the same buffer as the
payload, so an all-gather of bytes is one collective call in the steady state.

Link emulation (see LinkConfig): the sender stamps the moment its uplink starts pushing the
payload (time.time_ns(), after earlier messages on the same uplink have drained); the receiver
computes arrival_j = send_j + latency + (N-1) * bytes_j * 8 / bandwidth for each peer j and
sleeps until the latest arrival if that is still in the future. Compute done between
start_all_gather_bytes() and wait() therefore hides link time, as on a real link, and the real
loopback transfer overlaps with the emulated one (the wait is max(real, emulated), not the sum).
The stamps compare clocks of different processes: exact on one host; across hosts the clocks must
be synchronised (NTP/PTP) to well below the latencies being emulated.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from astra.net.link import LinkConfig, Uplink

_HEADER_WORDS = 4  # int64: op code, sequence number, payload bytes, send time (ns since epoch)
_HEADER_BYTES = _HEADER_WORDS * 8
_ALIGN = 16  # payload slots are padded to a multiple of this, so views as any dtype are aligned
_OP_ALL_GATHER, _OP_ALL_REDUCE, _OP_P2P = 1, 2, 3
_OP_NAMES = {_OP_ALL_GATHER: "all_gather", _OP_ALL_REDUCE: "all_reduce", _OP_P2P: "send/recv"}
# Point-to-point messages travel in chunks of at most _P2P_CHUNK bytes, each into one of the
# _P2P_WINDOW receives a receiver keeps posted per sender (see Communicator.expect).
_P2P_CHUNK = 64 * 1024
_P2P_WINDOW = 8
# p2p header: the common 4 words, then dtype index, ndim and up to _MAX_DIMS sizes
_MAX_DIMS = 8
_DTYPES = [
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]


class PeerFailure(RuntimeError):
    """A collective timed out, or a peer died or disconnected, or ranks disagreed on the call."""


@dataclass
class _Counters:
    bytes_sent: int = 0  # payload bytes this rank pushed on its uplink (all unicasts)
    bytes_received: int = 0  # payload bytes this rank received from its peers
    num_messages: int = 0  # communicator operations (one all-gather = one message)
    comm_ms: float = 0.0  # wall time inside communicator calls (issue + wait)
    wait_ms: float = 0.0  # part of comm_ms spent blocked on peers or the emulated link
    emulated_ms: float = 0.0  # part of wait_ms spent sleeping for the emulated link


@dataclass
class CommStats(_Counters):
    """Byte and time accounting of one Communicator; totals plus a breakdown per phase.

    Bytes are payload bytes as charged by the link model (headers are control data, not
    counted): an all-gather sends bytes * (N-1) and receives the sum of the peers' payloads.
    """

    phases: dict[str, _Counters] = field(default_factory=dict)
    _current: list[str] = field(default_factory=list, repr=False)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute traffic inside the block to `name` (nested phases: the innermost wins)."""
        self.phases.setdefault(name, _Counters())
        self._current.append(name)
        try:
            yield
        finally:
            self._current.pop()

    def add(self, **deltas: float) -> None:
        targets: list[_Counters] = [self]
        if self._current:
            targets.append(self.phases[self._current[-1]])
        for target in targets:
            for key, value in deltas.items():
                setattr(target, key, getattr(target, key) + value)

    def reset(self) -> None:
        for key in asdict(_Counters()):
            setattr(self, key, type(getattr(self, key))())
        self.phases.clear()

    def to_dict(self) -> dict:
        out = {key: getattr(self, key) for key in asdict(_Counters())}
        out["phases"] = {name: asdict(c) for name, c in self.phases.items()}
        return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class AllGatherHandle:
    """An all-gather in flight; wait() returns every rank's payload (cached after the first)."""

    def __init__(
        self,
        comm: Communicator,
        work,
        buf: torch.Tensor,
        out: torch.Tensor,
        payload: torch.Tensor,
        capacity: int,
        op: int,
        seq: int,
        t_start: float,
    ) -> None:
        self._comm, self._work, self._buf, self._out = comm, work, buf, out
        self._payload, self._capacity, self._op, self._seq = payload, capacity, op, seq
        self._t_start = t_start
        self._result: list[torch.Tensor] | None = None

    def wait(self) -> list[torch.Tensor]:
        if self._result is None:
            self._result = self._comm._finish_all_gather(self)
        return self._result


class Communicator:
    """Collectives over `group` with an emulated `link`, a `timeout_s` on every wait, and stats.

    The group is created by the caller (see astra.net.launch) and passed in. Operations must be
    issued in the same order on every rank of the group (as with torch.distributed itself); a
    sequence number in each header turns a mismatch into a PeerFailure instead of garbage.
    Results of all_gather_* are views into one receive buffer; copy them to keep them apart.
    """

    def __init__(
        self, group: dist.ProcessGroup, link: LinkConfig | None = None, timeout_s: float = 60.0
    ) -> None:
        self.group = group
        self.uplink = Uplink(link if link is not None else LinkConfig())
        self.timeout_s = float(timeout_s)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        is_nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if is_nccl else None
        self._capacity = 0  # payload slot size agreed by all ranks (= last round's largest payload)
        self._seq = 0  # collective sequence number, identical on all ranks
        self._mailbox = _mailbox(group)  # p2p state of the group, shared by its communicators
        self._pending_sends: list[tuple] = []  # (work, buffer, dst) of send_tensor in flight

    @property
    def link(self) -> LinkConfig:
        return self.uplink.link

    @link.setter
    def link(self, link: LinkConfig) -> None:  # a new link for the next messages (a trace)
        self.uplink.link = link

    # ---- all-gather of bytes -------------------------------------------------------------

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D uint8 payload (sizes may differ), in rank order."""
        return self.start_all_gather_bytes(payload).wait()

    def start_all_gather_bytes(self, payload: torch.Tensor) -> AllGatherHandle:
        """Start an all-gather and return at once; compute before handle.wait() hides the link."""
        return self._start_all_gather(payload, _OP_ALL_GATHER)

    def _start_all_gather(self, payload: torch.Tensor, op: int) -> AllGatherHandle:
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise TypeError(
                f"payload must be a 1-D uint8 tensor, got {payload.dtype} {tuple(payload.shape)}"
            )
        t_start = time.perf_counter()
        self._seq += 1
        num_bytes = payload.numel()
        num_peers = self.world_size - 1
        if op == _OP_ALL_REDUCE:  # ring all-reduce: 2(N-1)/N of the tensor leaves each uplink
            sent = num_bytes * 2 * num_peers / self.world_size
        else:
            sent = num_bytes * num_peers
        send_s = self._reserve_uplink(sent)
        if op == _OP_ALL_GATHER:
            # N-1 unicasts into the receives every peer keeps posted (expect): what the link
            # model charges, and on a real link one latency instead of gloo's ring of 2(N-1)
            for dst in range(self.world_size):
                if dst != self.rank:
                    self._send_stream(payload, dst, op, send_s)
            self.stats.add(
                comm_ms=(time.perf_counter() - t_start) * 1e3,
                num_messages=1,
                bytes_sent=int(round(sent)),
            )
            return AllGatherHandle(self, None, None, None, payload, 0, op, self._seq, t_start)
        # One buffer per rank: header | payload padded to the agreed capacity. If this payload
        # does not fit, only the header is useful and wait() runs a second round.
        slot = _HEADER_BYTES + self._capacity
        buf = torch.empty(slot, dtype=torch.uint8, device=self.device)  # padding is never read
        header = torch.tensor([op, self._seq, num_bytes, int(send_s * 1e9)], dtype=torch.int64)
        buf[:_HEADER_BYTES] = header.view(torch.uint8).to(buf.device)
        fits = min(num_bytes, self._capacity)
        buf[_HEADER_BYTES : _HEADER_BYTES + fits] = payload[:fits].to(buf.device)
        out = torch.empty(self.world_size * slot, dtype=torch.uint8, device=self.device)
        work = self._call(
            "all_gather", lambda: dist.all_gather_single(out, buf, group=self.group, async_op=True)
        )
        self.stats.add(
            comm_ms=(time.perf_counter() - t_start) * 1e3,
            num_messages=1,
            bytes_sent=int(round(sent)),
        )
        return AllGatherHandle(
            self, work, buf, out, payload, self._capacity, op, self._seq, t_start
        )

    def _finish_all_gather(self, h: AllGatherHandle) -> list[torch.Tensor]:
        t_wait = time.perf_counter()
        op_name = _OP_NAMES[h._op]
        if h._work is None:  # unicasts (all-gather of bytes)
            payloads: list[torch.Tensor] = []
            headers = []
            for src in range(self.world_size):
                if src == self.rank:
                    payloads.append(h._payload)  # our own bytes never crossed a link
                    headers.append([h._op, h._seq, h._payload.numel(), 0])
                    continue
                got, header = self._recv_stream(src, h._op)
                payloads.append(got)
                headers.append(header)
            sizes = [p.numel() for p in payloads]
            return self._charge_all_gather(h, headers, sizes, payloads, t_wait)
        self._wait_work(h._work, op_name)
        slot = _HEADER_BYTES + h._capacity
        out = h._out.view(self.world_size, slot)
        # (N, 4) int64 -> list of [op, seq, num_bytes, send_ns] per rank
        headers = out[:, :_HEADER_BYTES].cpu().contiguous().view(torch.int64).tolist()
        for r in range(self.world_size):
            op, seq = headers[r][0], headers[r][1]
            if op != h._op or seq != h._seq:
                raise PeerFailure(
                    f"rank {self.rank}: {op_name} #{h._seq} got {_OP_NAMES.get(op, op)} #{seq} "
                    f"from rank {r}; ranks must issue communicator calls in the same order"
                )
        sizes = [h[2] for h in headers]
        largest = max(sizes)
        if largest > h._capacity:  # second round with a slot large enough for everyone
            cap = _round_up(largest, _ALIGN)
            buf = torch.empty(cap, dtype=torch.uint8, device=self.device)
            buf[: h._payload.numel()] = h._payload.to(buf.device)
            out2 = torch.empty(self.world_size * cap, dtype=torch.uint8, device=self.device)
            work = self._call(
                op_name, lambda: dist.all_gather_single(out2, buf, group=self.group, async_op=True)
            )
            self._wait_work(work, op_name)
            payloads = [out2[r * cap : r * cap + sizes[r]] for r in range(self.world_size)]
        else:
            payloads = [
                out[r, _HEADER_BYTES : _HEADER_BYTES + sizes[r]] for r in range(self.world_size)
            ]
        payloads[self.rank] = h._payload  # our own bytes never crossed a link
        # Next round's slot: this round's largest payload, so steady-state calls take one round
        # and a shrinking payload (prefill -> decode) stops paying for the old size right away.
        self._capacity = _round_up(largest, _ALIGN)
        return self._charge_all_gather(h, headers, sizes, payloads, t_wait)

    def _charge_all_gather(self, h, headers, sizes, payloads, t_wait) -> list[torch.Tensor]:
        """Sleep out the emulated link (until the last peer's payload would have arrived),
        count the wait and the bytes, return the payloads."""
        emulated_s = 0.0
        if not self.link.is_ideal:
            arrival = max(
                (
                    self._arrival_s(h._op, headers[r][3], sizes[r])
                    for r in range(self.world_size)
                    if r != self.rank
                ),
                default=0.0,
            )
            emulated_s = max(0.0, arrival - time.time())
            if emulated_s > 0:
                time.sleep(emulated_s)
        waited_ms = (time.perf_counter() - t_wait) * 1e3
        received = sum(sizes) - sizes[self.rank]
        if h._op == _OP_ALL_REDUCE:
            received = received * 2 / self.world_size  # ring: 2(N-1)/N of a tensor comes in
        self.stats.add(
            comm_ms=waited_ms,
            wait_ms=waited_ms,
            emulated_ms=emulated_s * 1e3,
            bytes_received=int(round(received)),
        )
        return payloads

    # ---- full-precision baselines --------------------------------------------------------

    def all_gather_tensor(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        """Each rank's tensor, in rank order (sequence-parallel all-gather of hidden states).

        All ranks pass the same dtype and the same sizes except along `dim`, which may differ.
        """
        shape = list(x.shape)
        dim = dim % len(shape) if shape else 0
        row_bytes = x.element_size() * math.prod(shape[:dim] + shape[dim + 1 :] if shape else [])
        parts = self.all_gather_bytes(as_bytes(x))
        out = []
        for part in parts:
            if row_bytes == 0 or part.numel() % row_bytes:
                raise PeerFailure(
                    f"rank {self.rank}: all_gather_tensor got {part.numel()} bytes, not a whole "
                    f"number of {x.dtype} slices of shape {shape} along dim {dim}"
                )
            if shape:
                shape[dim] = part.numel() // row_bytes
            out.append(from_bytes(part, x.dtype, shape, x.device))
        return out

    def all_reduce_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over ranks (tensor-parallel all-reduce), bit-identical on every rank.

        Moved as an all-gather and summed in rank order (deterministic), but the link is charged
        the ring all-reduce a real deployment would run: 2(N-1) steps of bytes/N each.
        """
        h = self._start_all_gather(as_bytes(x), _OP_ALL_REDUCE)
        parts = [from_bytes(p, x.dtype, list(x.shape), x.device) for p in h.wait()]
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def send_tensor(self, x: torch.Tensor, dst: int) -> None:
        """Point-to-point send to group rank dst (pipeline parallelism); emulated as one peer.

        Returns once the send is queued, like a socket write into a buffer: gloo's send blocks
        until the peer posts its receive, which would deadlock two ranks that both send, then
        receive. x is copied, so the caller may reuse it. Call wait_sends() before a rank exits.
        """
        t_start = time.perf_counter()
        self._reap_sends(block=False)
        if x.dim() > _MAX_DIMS:
            raise ValueError(f"send_tensor supports up to {_MAX_DIMS} dims, got {x.dim()}")
        payload = as_bytes(x).to(self.device)
        send_s = self._reserve_uplink(payload.numel())
        self._send_stream(payload, dst, _OP_P2P, send_s, x.dtype, tuple(x.shape))
        self.stats.add(
            comm_ms=(time.perf_counter() - t_start) * 1e3,
            num_messages=1,
            bytes_sent=payload.numel(),
        )

    def wait_sends(self) -> None:
        """Block until every queued send_tensor has been received (PeerFailure on timeout)."""
        t_start = time.perf_counter()
        self._reap_sends(block=True)
        elapsed_ms = (time.perf_counter() - t_start) * 1e3
        self.stats.add(comm_ms=elapsed_ms, wait_ms=elapsed_ms)

    def _reap_sends(self, block: bool) -> None:
        pending = []
        for work, t, dst in self._pending_sends:
            if block:
                self._wait_work(work, f"send to rank {dst}")
            elif not work.is_completed():
                pending.append((work, t, dst))
            else:
                self._wait_work(work, f"send to rank {dst}")  # surfaces a failed send
        self._pending_sends = pending

    def recv_tensor(self, src: int) -> torch.Tensor:
        """Receive the next tensor that group rank src sent with send_tensor."""
        t_start = time.perf_counter()
        self._reap_sends(block=False)
        payload, header = self._recv_stream(src, _OP_P2P)
        num_bytes, send_ns = header[2], header[3]
        dtype = _DTYPES[header[_HEADER_WORDS]]
        ndim = header[_HEADER_WORDS + 1]
        shape = header[_HEADER_WORDS + 2 : _HEADER_WORDS + 2 + ndim]
        emulated_s = 0.0
        if not self.link.is_ideal:
            emulated_s = max(
                0.0,
                self.uplink.arrival_s(send_ns * 1e-9, num_bytes, "p2p", self.world_size)
                - time.time(),
            )
            if emulated_s > 0:
                time.sleep(emulated_s)
        elapsed_ms = (time.perf_counter() - t_start) * 1e3
        self.stats.add(
            comm_ms=elapsed_ms,
            wait_ms=elapsed_ms,
            emulated_ms=emulated_s * 1e3,
            num_messages=1,
            bytes_received=num_bytes,
        )
        return from_bytes(payload, dtype, shape, payload.device)

    def expect(self, src: int) -> None:
        """Keep _P2P_WINDOW receives posted for group rank src's next chunks (idempotent).

        gloo over TCP sends a message only once the receiver's ready-to-receive notice has
        arrived, so a receive posted when the data is needed costs a round trip on top of the
        transfer (measured on a shaped link: about 4 one-way latencies per message, where the
        link model charges one; benchmarks/network.md). Receives posted several messages ahead
        let each chunk leave as soon as it is sent, whatever the latency: gloo matches a
        sender's chunks to the posted receives in order, and a chunk may be shorter than its
        receive."""
        posted = self._mailbox.posted.setdefault((src, self.rank), collections.deque())
        peer = dist.get_global_rank(self.group, src)
        while len(posted) < _P2P_WINDOW:
            buffer = torch.empty(_P2P_CHUNK, dtype=torch.uint8, device=self.device)
            work = self._call("recv", lambda b=buffer: dist.irecv(b, peer, group=self.group))
            posted.append((work, buffer))

    def _send_stream(
        self,
        payload: torch.Tensor,
        dst: int,
        op: int,
        send_s: float,
        dtype: torch.dtype = torch.uint8,
        shape: tuple = (),
    ) -> None:
        """Queue header | payload for dst as chunks that fit the receives dst keeps posted: a
        message of up to 64 kB (ASTRA's codes) is one gloo send that leaves at once."""
        box = self._mailbox
        key = (self.rank, dst)
        box.seq[key] = seq = box.seq.get(key, 0) + 1
        header = torch.zeros(_P2P_HEADER_WORDS, dtype=torch.int64)
        header[:_HEADER_WORDS] = torch.tensor([op, seq, payload.numel(), int(send_s * 1e9)])
        header[_HEADER_WORDS] = _DTYPES.index(dtype)
        header[_HEADER_WORDS + 1] = len(shape)
        header[_HEADER_WORDS + 2 : _HEADER_WORDS + 2 + len(shape)] = torch.tensor(shape)
        stream = torch.cat([header.view(torch.uint8).to(payload.device), payload])
        peer = dist.get_global_rank(self.group, dst)
        for t in stream.split(_P2P_CHUNK):
            work = self._call("send", lambda t=t: dist.isend(t, peer, group=self.group))
            self._pending_sends.append((work, t, dst))  # t must live until sent

    def _recv_stream(self, src: int, op: int) -> tuple[torch.Tensor, list[int]]:
        """The next message from src: (payload bytes, its header as ints), checked against the
        expected op and this pair's sequence number."""
        box = self._mailbox
        key = (src, self.rank)
        box.seq[key] = seq = box.seq.get(key, 0) + 1
        first = self._next_chunk(src, op)
        header = first[:_P2P_HEADER_BYTES].cpu().view(torch.int64).tolist()
        got_op, got_seq, num_bytes = header[0], header[1], header[2]
        if got_op != op or got_seq != seq:
            raise PeerFailure(
                f"rank {self.rank}: {_OP_NAMES[op]} #{seq} from rank {src} got "
                f"{_OP_NAMES.get(got_op, got_op)} #{got_seq}; ranks must issue communicator "
                "calls in the same order"
            )
        total = _P2P_HEADER_BYTES + num_bytes
        chunks = [first[: min(total, _P2P_CHUNK)]]
        for start in range(_P2P_CHUNK, total, _P2P_CHUNK):  # the rest of a large message
            chunks.append(self._next_chunk(src, op)[: min(_P2P_CHUNK, total - start)])
        return torch.cat(chunks)[_P2P_HEADER_BYTES:], header  # (num_bytes,), a copy

    def _next_chunk(self, src: int, op: int) -> torch.Tensor:
        """The next chunk from src (its posted buffer; only the sent prefix is meaningful)."""
        self.expect(src)
        work, buffer = self._mailbox.posted[(src, self.rank)].popleft()
        self._wait_work(work, f"{_OP_NAMES[op]} from rank {src}")
        self.expect(src)  # top the window up at once: the sender never waits for a notice
        return buffer

    def now(self) -> float:
        """Wall-clock seconds for timing a phase (the lockstep communicator's is virtual)."""
        return time.perf_counter()

    def barrier(self) -> None:
        """Synchronise all ranks (not charged to the link, not counted in stats)."""
        work = self._call("barrier", lambda: dist.barrier(group=self.group, async_op=True))
        self._wait_work(work, "barrier")

    # ---- helpers -------------------------------------------------------------------------

    def _reserve_uplink(self, num_bytes_on_wire: float) -> float:
        """Queue num_bytes_on_wire on this rank's uplink; returns when it starts (time.time())."""
        return self.uplink.reserve(time.time(), num_bytes_on_wire)

    def _arrival_s(self, op: int, send_ns: int, num_bytes: int) -> float:
        kind = "all_reduce" if op == _OP_ALL_REDUCE else "all_gather"
        return self.uplink.arrival_s(send_ns * 1e-9, num_bytes, kind, self.world_size)

    def _call(self, op_name: str, issue):
        try:
            return issue()
        except Exception as exc:  # a peer that already died fails the issue itself
            raise PeerFailure(f"rank {self.rank}: {op_name} failed to start: {exc}") from exc

    def _wait_work(self, work, op_name: str) -> None:
        t0 = time.perf_counter()
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            elapsed = time.perf_counter() - t0
            what = "timed out" if "timed out" in str(exc).lower() else "failed"
            raise PeerFailure(
                f"rank {self.rank}: {op_name} {what} after {elapsed:.1f}s (timeout "
                f"{self.timeout_s:g}s, world size {self.world_size}); a peer is slow, dead or "
                f"out of step: {exc}"
            ) from exc


_P2P_HEADER_WORDS = _HEADER_WORDS + 2 + _MAX_DIMS
_P2P_HEADER_BYTES = _P2P_HEADER_WORDS * 8


@dataclass
class _Mailbox:
    """One process group's point-to-point state, shared by every Communicator on it: sequence
    numbers and the receives posted ahead per sender (a receive posted by one communicator
    catches the next chunk whichever communicator sent it)."""

    seq: dict = field(default_factory=dict)  # (src, dst) -> messages so far
    posted: dict = field(default_factory=dict)  # (src, dst) -> deque of (work, buffer)


_mailboxes: dict[int, tuple] = {}  # id(group) -> (group, its _Mailbox)


def _mailbox(group: dist.ProcessGroup) -> _Mailbox:
    entry = _mailboxes.get(id(group))
    if entry is None or entry[0] is not group:  # a new group may reuse a dead one's id
        entry = _mailboxes[id(group)] = (group, _Mailbox())
    return entry[1]


def all_gather_json(comm: Communicator, obj) -> list:
    """Every rank's JSON-able `obj` (tensors become lists), in rank order. What peers send is
    parsed as JSON, never unpickled: a peer cannot make this process run code."""

    def plain(value):
        if isinstance(value, torch.Tensor):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} is not JSON data")

    data = json.dumps(obj, default=plain).encode()
    parts = comm.all_gather_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return [json.loads(part.numpy().tobytes().decode()) for part in parts]


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of x's bytes (copies only if x is not contiguous)."""
    return x.contiguous().reshape(-1).view(torch.uint8)


def from_bytes(
    buf: torch.Tensor, dtype: torch.dtype, shape: list[int], device: torch.device | None
) -> torch.Tensor:
    if buf.storage_offset() % torch.empty((), dtype=dtype).element_size():
        buf = buf.clone()  # the slot is not aligned for dtype (only for the caller's own tensor)
    return buf.view(dtype).reshape(shape).to(device)
