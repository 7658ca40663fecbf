"""Transport: link parsers and cost model, loss model, communicator and launcher over gloo.

Multi-rank tests start local gloo ranks with astra.net.spawn (the first launch imports torch in
a fork server, about 3-5 s; later ones take well under a second); each launch checks several
things and the parent asserts on what the ranks return.
"""

import math
import os
import re
import time

import pytest
import torch

from astra.net import (
    CommStats,
    Communicator,
    LinkConfig,
    LossModel,
    PeerFailure,
    WorkerFailure,
    init_from_env,
    parse_bandwidth,
    parse_latency,
    rank0_logger,
    spawn,
)

# Timing slack: the machine has 2 cores shared by every rank (and by other jobs), so scheduling
# adds tens of ms. Lower bounds are exact (the emulator sleeps until the model time); upper
# bounds allow SLACK_S on top of the model time.
SLACK_S = 0.35

# ---- link model (no processes) -------------------------------------------------------------


@pytest.mark.parametrize("text, mbps", [
    ("10mbit", 10.0), ("10Mbps", 10.0), ("1gbit", 1000.0), ("500kbit", 0.5),
    ("2.5 mbit", 2.5), ("10MBps", 80.0), ("inf", math.inf), ("unlimited", math.inf),
])
def test_parse_bandwidth(text, mbps):
    assert parse_bandwidth(text) == mbps


@pytest.mark.parametrize("text", ["10", "fast", "-5mbit", "0mbit", "10mb", "", "10 furlongs"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(ValueError, match=r"bad bandwidth .*e\.g\. \"10mbit\""):
        parse_bandwidth(text)


@pytest.mark.parametrize("text, ms", [
    ("20ms", 20.0), ("0.5s", 500.0), ("0", 0.0), ("250us", 0.25), ("1.5 MS", 1.5),
])
def test_parse_latency(text, ms):
    assert parse_latency(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["20", "-1ms", "abc", "5 minutes"])
def test_parse_latency_rejects(text):
    with pytest.raises(ValueError, match=r"bad latency .*e\.g\. \"20ms\""):
        parse_latency(text)


def test_link_config_validates_and_costs():
    with pytest.raises(ValueError, match="bandwidth_mbps"):
        LinkConfig(bandwidth_mbps=0)
    with pytest.raises(ValueError, match="latency_ms"):
        LinkConfig(bandwidth_mbps=10, latency_ms=-1)
    with pytest.raises(ValueError, match="loss_rate"):
        LinkConfig(bandwidth_mbps=10, loss_rate=1.5)
    link = LinkConfig.from_strings("10mbit", "20ms")
    # latency + peers * bytes * 8 / bandwidth: 20 ms + 3 * 125 kB * 8 / 10 Mbit/s = 320 ms
    assert link.transfer_time_s(125_000, 3) == pytest.approx(0.020 + 0.300)
    assert link.transfer_time_s(125_000, 0) == 0.0
    # ring all-reduce over 4: 6 steps of (latency + 125 kB / 4 over the link)
    assert link.ring_all_reduce_time_s(125_000, 4) == pytest.approx(6 * (0.020 + 0.025))
    ideal = LinkConfig()
    assert ideal.is_ideal and ideal.transfer_time_s(10**9, 3) == 0.0
    assert LinkConfig(math.inf, 5.0).transfer_time_s(10**9, 3) == pytest.approx(0.005)


def test_loss_model_is_deterministic():
    a, b = LossModel(0.3, seed=7), LossModel(0.3, seed=7)
    # same key -> same verdict, whatever the call order
    m1 = a.dropped_mask(10_000, "layer", 3, 0, 1)
    a.dropped_mask(50, "other")
    assert torch.equal(m1, b.dropped_mask(10_000, "layer", 3, 0, 1))
    assert torch.equal(m1, a.dropped_mask(10_000, "layer", 3, 0, 1))
    assert abs(m1.float().mean().item() - 0.3) < 0.02
    assert not torch.equal(m1, a.dropped_mask(10_000, "layer", 3, 1, 0))
    assert not torch.equal(m1, LossModel(0.3, seed=8).dropped_mask(10_000, "layer", 3, 0, 1))
    verdicts = [a.message_dropped(step) for step in range(2000)]
    assert verdicts == [b.message_dropped(step) for step in range(2000)]
    assert 0.25 < sum(verdicts) / len(verdicts) < 0.35
    assert not LossModel(0.0).dropped_mask(100, 1).any()
    assert LossModel(1.0).dropped_mask(100, 1).all()
    with pytest.raises(ValueError, match="loss rate"):
        LossModel(-0.1)


def test_comm_stats_phases():
    stats = CommStats()
    stats.add(bytes_sent=10, num_messages=1)
    with stats.phase("prefill"):
        stats.add(bytes_sent=100, comm_ms=2.0)
        with stats.phase("decode"):
            stats.add(bytes_received=7)
    d = stats.to_dict()
    assert d["bytes_sent"] == 110 and d["bytes_received"] == 7 and d["num_messages"] == 1
    assert d["phases"]["prefill"]["bytes_sent"] == 100
    assert d["phases"]["decode"] == {**d["phases"]["decode"], "bytes_received": 7, "bytes_sent": 0}


def test_rank0_logger_and_env_errors(capsys, monkeypatch):
    rank0_logger(0, "astra.test").info("hello from rank 0")
    rank0_logger(1, "astra.test").info("hello from rank 1")
    err = capsys.readouterr().err
    assert "[rank0]" in err and "hello from rank 0" in err and "rank 1" not in err
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match=r"init_from_env needs \['RANK'"):
        init_from_env("gloo")


# ---- communicator over real gloo ranks ------------------------------------------------------


def _payload(rank: int, round_: int) -> torch.Tensor:
    """Uneven, rank- and round-specific bytes; sizes grow, shrink and include zero."""
    size = [(5 + 3 * rank), (1000 - 200 * rank), 0 if rank == 1 else 17, 4096][round_ % 4]
    return ((torch.arange(size) * (rank + 1) + round_) % 251).to(torch.uint8)


def _healthy_job(rank, world_size, group, link_args):
    ideal = Communicator(group, timeout_s=30)
    out = {}
    # 1. every rank's exact payload, uneven sizes, one communicator reused across rounds
    with ideal.stats.phase("gather"):
        out["gather_ok"] = [
            all(torch.equal(got, _payload(r, i)) for r, got in
                enumerate(ideal.all_gather_bytes(_payload(rank, i))))
            for i in range(6)
        ]
    sent = sum(_payload(rank, i).numel() for i in range(6)) * (world_size - 1)
    received = sum(_payload(r, i).numel() for i in range(6) for r in range(world_size) if r != rank)
    out["bytes_expected"] = (sent, received, 6)
    # 2. baselines: hidden states split along the sequence (uneven), TP all-reduce, p2p
    x = torch.randn(2, 3 + rank, 8, generator=torch.Generator().manual_seed(rank))
    parts = ideal.all_gather_tensor(x, dim=1)
    out["tensor_ok"] = all(
        torch.equal(p, torch.randn(2, 3 + r, 8, generator=torch.Generator().manual_seed(r)))
        for r, p in enumerate(parts)
    )
    y = ideal.all_reduce_tensor(torch.full((5,), float(rank + 1), dtype=torch.bfloat16))
    out["reduce"] = y.float().tolist()
    if rank < 2:  # both send first, then receive: must not deadlock (gloo send is rendezvous)
        other = 1 - rank
        mine = torch.arange(12, dtype=torch.int16).reshape(3, 4) + rank
        ideal.send_tensor(mine, other)
        mine.zero_()  # send_tensor copied it
        z = ideal.recv_tensor(other)
        ideal.wait_sends()
        expected = torch.arange(12, dtype=torch.int16).reshape(3, 4) + other
        out["p2p_ok"] = z.dtype == torch.int16 and torch.equal(z, expected)
    out["stats"] = ideal.stats.to_dict()
    # 3. overhead of a 1 kB all-gather on loopback (ideal link)
    one_kb = torch.zeros(1000, dtype=torch.uint8)
    ideal.all_gather_bytes(one_kb)
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        ideal.all_gather_bytes(one_kb)
        times.append(time.perf_counter() - t0)
    out["gather_1kb_ms"] = sorted(times)[len(times) // 2] * 1e3
    # 4. emulated link: a gather takes the model time; compute between start and wait hides it
    link = LinkConfig(*link_args)
    comm = Communicator(group, link, timeout_s=30)
    payload = torch.zeros(10_000, dtype=torch.uint8)
    model_s = link.transfer_time_s(payload.numel(), world_size - 1)
    comm.all_gather_bytes(payload)  # agree on the slot size, so the timed calls are one round
    # Ranks leave a barrier a few ms apart, so times are wall-clock stamps (one host) and the
    # parent measures each rank's end against the latest start among its peers.
    ideal.barrier()
    start = time.time()
    comm.all_gather_bytes(payload)
    out["blocking"] = (start, time.time())
    ideal.barrier()
    out["overlap_start"] = time.time()
    t0 = time.perf_counter()
    handle = comm.start_all_gather_bytes(payload)
    a = torch.randn(128, 128)
    while time.perf_counter() - t0 < model_s:  # "compute" for the model time
        a = torch.tanh(a @ a)
    compute_s = time.perf_counter() - t0
    handle.wait()
    out["overlap_s"] = (compute_s, time.perf_counter() - t0)
    out["model_s"] = model_s
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_communicator_on_gloo(world_size):
    link_args = (1.0, 50.0)  # 1 Mbit/s, 50 ms: a 10 kB gather is 130 ms at N=2, 290 ms at N=4
    results = spawn(_healthy_job, world_size, args=(link_args,), timeout_s=120)
    for rank, out in enumerate(results):
        assert all(out["gather_ok"]), (rank, out["gather_ok"])
        assert out["tensor_ok"]
        assert out["reduce"] == [world_size * (world_size + 1) / 2] * 5
        if rank < 2:
            assert out["p2p_ok"]
        sent, received, num_gathers = out["bytes_expected"]
        gather = out["stats"]["phases"]["gather"]
        assert (gather["bytes_sent"], gather["bytes_received"]) == (sent, received)
        assert gather["num_messages"] == num_gathers
        model_s = out["model_s"]
        last_peer_start = max(o["blocking"][0] for r, o in enumerate(results) if r != rank)
        blocking_s = out["blocking"][1] - last_peer_start
        assert model_s - 1e-3 <= blocking_s < model_s + SLACK_S, (rank, blocking_s, model_s)
        compute_s, total_s = out["overlap_s"]
        # overlapped: about max(compute, link), far below their sum (2 * model_s)
        skew_s = max(o["overlap_start"] for o in results) - out["overlap_start"]
        assert total_s < max(compute_s, model_s) + skew_s + SLACK_S, (out["overlap_s"], skew_s)
        assert total_s < compute_s + model_s - 0.05, out["overlap_s"]
        print(f"N={world_size} rank {rank}: 1 kB gather {out['gather_1kb_ms']:.2f} ms, "
              f"blocking {blocking_s * 1e3:.0f} ms (model {model_s * 1e3:.0f}), "
              f"overlap {total_s * 1e3:.0f} ms (compute {compute_s * 1e3:.0f})")


# ---- failures: never hang, name the rank ---------------------------------------------------


def _raising_job(rank, world_size, group):
    comm = Communicator(group, timeout_s=60)
    comm.all_gather_bytes(torch.zeros(4, dtype=torch.uint8))
    if rank == 1:
        raise ValueError("boom from the test")
    comm.all_gather_bytes(torch.zeros(4, dtype=torch.uint8))  # blocks: rank 1 never joins


def _exiting_job(rank, world_size, group):
    if rank == 1:
        os._exit(3)
    Communicator(group, timeout_s=60).all_gather_bytes(torch.zeros(4, dtype=torch.uint8))


def _timeout_job(rank, world_size, group):
    comm = Communicator(group, timeout_s=0.5)
    if rank == 1:
        time.sleep(2.0)
        return None
    t0 = time.perf_counter()
    try:
        comm.all_gather_bytes(torch.zeros(4, dtype=torch.uint8))
    except PeerFailure as exc:
        return str(exc), time.perf_counter() - t0
    return "no error", time.perf_counter() - t0


@pytest.mark.slow
def test_spawn_reports_raising_rank():
    t0 = time.monotonic()
    one_line = r"^device 1 failed: ValueError: boom from the test( \(then devices \[0\].*\))?$"
    with pytest.raises(WorkerFailure, match=one_line) as e:
        spawn(_raising_job, 2, timeout_s=60)
    assert e.value.rank == 1
    assert time.monotonic() - t0 < 40


@pytest.mark.slow
def test_spawn_reports_dead_rank():
    with pytest.raises(WorkerFailure, match=r"device 1 failed: process exited with code 3"):
        spawn(_exiting_job, 2, timeout_s=60)


@pytest.mark.slow
def test_collective_timeout_raises_peer_failure():
    message, elapsed_s = spawn(_timeout_job, 2, timeout_s=60, collective_timeout_s=3)[0]
    # the late peer is named
    assert "rank 0: all_gather from rank 1 timed out" in message, message
    assert "timeout 0.5s" in message, message
    assert 0.4 < elapsed_s < 0.5 + SLACK_S + 0.5


def _sleeping_job(rank, world_size, group):
    time.sleep(60)


@pytest.mark.slow
def test_spawn_overall_timeout():
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"timed out after 1\.5s; ranks \[0, 1\] had not"):
        spawn(_sleeping_job, 2, timeout_s=1.5)
    assert time.monotonic() - t0 < 15  # first launch may include the fork server's torch import


def test_both_communicators_follow_the_protocol_and_share_the_link_model():
    """The real and the composed-mode communicator: one protocol, one Uplink model."""
    from astra.net.comm import Communicator
    from astra.net.link import LinkConfig, Uplink
    from astra.net.lockstep import LockstepComm, LockstepGroup
    from astra.net.protocol import Comm

    lockstep = LockstepComm(LockstepGroup(2, LinkConfig(10.0, 20.0)), rank=0)
    assert isinstance(lockstep, Comm)
    for name in ("start_all_gather_bytes", "send_tensor", "recv_tensor", "wait_sends", "now"):
        assert callable(getattr(Communicator, name)), name
    assert isinstance(lockstep.uplink, Uplink)
    # the uplink queues: a second 1.25 MB message starts when the first has left (1 s at 10 Mbit/s)
    up = Uplink(LinkConfig(10.0, 20.0))
    assert up.reserve(0.0, 1_250_000) == 0.0
    assert up.reserve(0.5, 1_250_000) == pytest.approx(1.0)
    assert up.arrival_s(1.0, 1_250_000, "p2p", 4) == pytest.approx(1.0 + 0.02 + 1.0)
    assert up.arrival_s(0.0, 1_250_000, "all_gather", 4) == pytest.approx(0.02 + 3.0)
    lockstep.link = LinkConfig(100.0, 0.0)  # a new link for the next messages (a trace)
    assert lockstep.uplink.link.bandwidth_mbps == 100.0


# ---- safety: loopback listeners, authenticated members -------------------------------------


def _listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets `pid` listens on (from /proc, no tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    hex_addr = cols[1].split(":")[0]
                    raw = bytes.fromhex(hex_addr)
                    # /proc stores addresses as native-endian 32-bit words
                    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
                    found.append(":".join(w.hex() for w in words))
    return found


def _listener_job(rank, world_size, group):
    ideal = Communicator(group, timeout_s=30)
    ideal.all_gather_bytes(torch.zeros(4, dtype=torch.uint8))  # the transport is connected
    listening = _listening_addresses(os.getpid())
    ideal.all_gather_bytes(torch.zeros(4, dtype=torch.uint8))  # nobody leaves before the read
    return listening


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_a_local_group_listens_on_loopback_only():
    """Rank 0's rendezvous store and every rank's gloo listener: 127.0.0.1, nothing else
    (torch's default store listens on every interface)."""
    listening = spawn(_listener_job, 2, timeout_s=60)
    assert listening[0], "rank 0 serves the store: it must listen somewhere"
    loopback = "7f000001"  # 127.0.0.1
    for rank, addresses in enumerate(listening):
        assert all(a == loopback for a in addresses), (rank, addresses)


def _wrong_secret_job(rank, world_size, group):
    from astra.net.auth import AuthenticationError, authenticate

    secret = b"the group's secret" if rank == 0 else b"an impostor's guess"
    try:
        authenticate(group, rank, world_size, secret)
    except AuthenticationError as exc:
        return str(exc)
    return "accepted"


def test_a_member_without_the_secret_is_refused_and_named():
    messages = spawn(_wrong_secret_job, 2, timeout_s=60)
    assert "device 0 refused the group: device 1 (" in messages[0], messages[0]
    assert "pid" in messages[0] and "shared secret" in messages[0]
    assert "device 1 refused the group: device 0 (" in messages[1], messages[1]


def test_multi_machine_secret_comes_from_the_environment(monkeypatch, tmp_path):
    from astra.net.auth import AuthenticationError, secret_from_env

    monkeypatch.delenv("ASTRA_SECRET", raising=False)
    monkeypatch.delenv("ASTRA_SECRET_FILE", raising=False)
    with pytest.raises(AuthenticationError, match="needs a shared secret of at least 16"):
        secret_from_env()
    monkeypatch.setenv("ASTRA_SECRET", "short")
    with pytest.raises(AuthenticationError, match=r"got 5 characters"):
        secret_from_env()
    (tmp_path / "token").write_text("a" * 40 + "\n")
    monkeypatch.setenv("ASTRA_SECRET_FILE", str(tmp_path / "token"))
    assert secret_from_env() == b"a" * 40
    monkeypatch.setenv("ASTRA_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(AuthenticationError, match="missing: cannot read it"):
        secret_from_env()


def _freezing_job(rank, world_size, group):
    import signal

    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen: alive, silent, holding its socket open
    Communicator(group, timeout_s=3).all_gather_bytes(torch.zeros(4, dtype=torch.uint8))


@pytest.mark.slow
def test_a_frozen_rank_is_named_not_the_peer_that_waited_for_it():
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure) as e:
        spawn(_freezing_job, 2, timeout_s=60, collective_timeout_s=3)
    message = str(e.value)
    assert re.match(r"device 1 failed: stopped answering \(pid \d+, stopped \(SIGSTOP\)\); its "
                    r"peers gave up after --peer-timeout 3 s", message), message
    assert e.value.rank == 1 and time.monotonic() - t0 < 20
