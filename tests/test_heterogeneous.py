"""Heterogeneous devices (paper App. D): emulated speeds in the composed mode, placements sized
from them, and the checks on `--device-speeds`.

The lockstep tests replace the CPU clock with a per-thread counter that each rank advances by
a known amount, so what the composed mode charges is exact, not timed."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from astra.bench import BenchConfig
from astra.cli.main import main
from astra.net import lockstep
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep
from astra.parallel.placement import (
    CausalCost,
    PlacementConfig,
    assign_tokens,
    causal_balanced_sizes,
    check_device_speeds,
    fit_causal_cost,
)
from astra.runner import Job, RunConfig, run_inference, run_ranks


class _FakeCpuClock:
    """time.thread_time stand-in: each thread's own counter, advanced by `work(seconds)`."""

    def __init__(self):
        self._local = threading.local()

    def __call__(self) -> float:
        return getattr(self._local, "t", 0.0)

    def work(self, seconds: float) -> None:
        self._local.t = self() + seconds


@pytest.fixture
def cpu_clock(monkeypatch):
    clock = _FakeCpuClock()
    monkeypatch.setattr(lockstep.time, "thread_time", clock)
    return clock


def test_composed_mode_charges_a_half_speed_device_twice_its_compute(cpu_clock):
    latency_s = 0.05

    def fn(rank, world_size, comm):
        cpu_clock.work(0.1)  # the same measured work on every rank
        if rank == 0:
            comm.send_tensor(torch.zeros(4, dtype=torch.uint8), 1)
        else:
            comm.recv_tensor(0)
        cpu_clock.work(0.1)
        return comm.now()

    link = LinkConfig(bandwidth_mbps=float("inf"), latency_ms=latency_s * 1e3)
    _, clocks, computes = run_lockstep(fn, 2, link, speeds=(1.0, 0.5))
    assert computes == pytest.approx([0.2, 0.4], abs=1e-9)  # rank 1: 2 x its measured 0.2 s
    # rank 0 sends at 0.1 s, it arrives at 0.15 s; rank 1 is then at 0.2 s (0.1 / 0.5): no wait
    assert clocks == pytest.approx([0.2, 0.4], abs=1e-9)
    _, clocks, computes = run_lockstep(fn, 2, link)  # equal devices: as before
    assert computes == pytest.approx([0.2, 0.2], abs=1e-9)
    assert clocks == pytest.approx([0.2, 0.25], abs=1e-9)  # rank 1 waits for the message


def test_a_fast_sender_hides_the_link_behind_a_slow_receiver(cpu_clock):
    # speeds > 1 scale down: rank 0 at speed 2 sends at 0.05 s, its message lands at 0.15 s
    def fn(rank, world_size, comm):
        cpu_clock.work(0.1)
        if rank == 0:
            comm.send_tensor(torch.zeros(1, dtype=torch.uint8), 1)
        else:
            comm.recv_tensor(0)
        return comm.now()

    link = LinkConfig(bandwidth_mbps=float("inf"), latency_ms=100.0)
    _, clocks, _ = run_lockstep(fn, 2, link, speeds=(2.0, 0.25))
    assert clocks == pytest.approx([0.05, 0.4], abs=1e-9)


def _times(sizes, cost, speeds):
    """Each device's cost / speed, the cost model written out independently of CausalCost.of."""
    out, done = [], 0
    for d, (n, s) in enumerate(zip(sizes, speeds)):
        sends = cost.last_encodes or d < len(sizes) - 1
        work = (
            n * (1 + cost.encode * sends)
            + cost.diagonal * n * n
            + cost.cross * done * n
            + cost.rebuild * done
        )
        out.append(work / s)
        done += n
    return out


@pytest.mark.parametrize("speeds", [(1.0, 0.5), (1.0, 1.0, 0.5, 0.5), (0.5, 1.0), (3.0, 1.0, 2.0)])
@pytest.mark.parametrize("cost", [
    CausalCost(cross=5e-4, diagonal=2e-3, encode=0.3, rebuild=0.05),  # SmolLM2-like, streamed
    CausalCost(cross=1e-3, diagonal=1e-3, last_encodes=True),
])  # fmt: skip
def test_balanced_sizes_with_speeds_equalise_cost_over_speed(speeds, cost):
    sizes = causal_balanced_sizes(1200, len(speeds), cost, speeds)
    assert sum(sizes) == 1200 and min(sizes) >= 1
    times = _times(sizes, cost, speeds)
    assert max(times) / min(times) < 1.02  # one token of rounding per chunk
    # better than ignoring the speeds, and than sizing by speed alone
    blind = causal_balanced_sizes(1200, len(speeds), cost)
    proportional = PlacementConfig(len(speeds), weights=speeds)
    by_speed = torch.bincount(assign_tokens(1200, proportional)).tolist()
    assert max(times) < max(_times(blind, cost, speeds))
    assert max(times) < max(_times(by_speed, cost, speeds))
    # the optimum spreads the split's own work over the group's total speed
    work = sum(t * s for t, s in zip(times, speeds))
    assert max(times) == pytest.approx(work / sum(speeds), rel=0.02)
    placement = PlacementConfig(len(speeds), kind="balanced", cost=cost, weights=speeds)
    assert torch.bincount(assign_tokens(1200, placement)).tolist() == sizes


def _records(sizes, unit, out_proj, enc, diag, cross, rebuild, fixed_ms):
    """What a contiguous pass with these chunk sizes reports (ms per stage, as
    astra.runner.fit_balanced_placement gathers them), made from known costs."""
    records, p = [], 0
    for d, n in enumerate(sizes):
        sends = d < len(sizes) - 1
        records.append({
            "tokens": n, "earlier": p, "sends": float(sends),
            "linear": (unit - out_proj) * n + fixed_ms, "encode": enc * n * sends,
            "local": diag * n * n, "remote": out_proj * n + cross * n * p,
            "rebuild": rebuild * p,
        })  # fmt: skip
        p += n
    return records


def test_fit_recovers_a_per_device_constant_from_unequal_chunks():
    # SmolLM2-like rates (ms) plus 150 ms every device pays whatever its share
    unit, out_proj, enc, diag, cross, rebuild, fixed_ms = 1.0, 0.1, 0.19, 7e-4, 4.7e-4, 0.032, 150
    speeds = (1.0, 1.0, 0.5, 0.5)
    proportional = torch.bincount(assign_tokens(1024, PlacementConfig(4, weights=speeds)))
    records = _records(proportional.tolist(), unit, out_proj, enc, diag, cross, rebuild, fixed_ms)
    cost = fit_causal_cost(records)
    assert cost.fixed == pytest.approx(fixed_ms / unit, rel=1e-3)
    for name, value in (("encode", enc), ("diagonal", diag), ("cross", cross),
                        ("rebuild", rebuild)):  # fmt: skip
        assert getattr(cost, name) == pytest.approx(value / unit, rel=1e-3), name
    truth = CausalCost(cross=cross, diagonal=diag, encode=enc, rebuild=rebuild, fixed=fixed_ms)
    sizes = causal_balanced_sizes(1024, 4, cost, speeds)
    times = [t + fixed_ms / s for t, s in zip(_times(sizes, truth, speeds), speeds)]
    assert max(times) / min(times) < 1.02
    # without the constant the slow devices get too much: their fixed part costs them double
    blind = causal_balanced_sizes(1024, 4, replace(cost, fixed=0.0), speeds)
    blind_times = [t + fixed_ms / s for t, s in zip(_times(blind, truth, speeds), speeds)]
    assert max(blind_times) > 1.1 * max(times)
    # alike chunks cannot tell a constant from the rates: it stays in them, as before
    equal = _records([256] * 4, unit, out_proj, enc, diag, cross, rebuild, fixed_ms)
    assert fit_causal_cost(equal).fixed == 0.0


def test_speeds_without_attention_cost_split_in_proportion():
    assert causal_balanced_sizes(900, 2, CausalCost(), (1.0, 0.5)) == [600, 300]
    assert causal_balanced_sizes(900, 3, CausalCost(), None) == [300, 300, 300]
    contiguous = PlacementConfig(4, weights=(1.0, 1.0, 0.5, 0.5))
    assert torch.bincount(assign_tokens(1200, contiguous)).tolist() == [400, 400, 200, 200]
    cost = CausalCost(cross=5e-4, diagonal=2e-3, encode=0.3, rebuild=0.05)
    assert causal_balanced_sizes(1000, 4, cost, (1.0,) * 4) == causal_balanced_sizes(1000, 4, cost)


@pytest.mark.parametrize("speeds,message", [
    ((1.0,), "device speeds 1 give 1 speed(s) for 2 devices: give one per device"),
    ((1.0, 0.5, 1.0), "device speeds 1,0.5,1 give 3 speed(s) for 2 devices"),
    ((1.0, 0.0), "device speed 0.0 (in 1,0) must be a finite number > 0"),
    ((1.0, -0.5), "device speed -0.5 (in 1,-0.5) must be a finite number > 0"),
    ((1.0, float("nan")), "device speed nan (in 1,nan) must be a finite number > 0"),
    ((float("inf"), 1.0), "device speed inf (in inf,1) must be a finite number > 0"),
])  # fmt: skip
def test_bad_speeds_are_refused_on_construction(speeds, message):
    for build in (
        lambda: check_device_speeds(speeds, 2),
        lambda: RunConfig(devices=2, device_speeds=speeds),
        lambda: BenchConfig(devices=(2,), device_speeds=speeds),
        lambda: run_lockstep(lambda *a: None, 2, LinkConfig(), speeds=speeds),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build()


def test_speeds_need_the_composed_mode_and_a_placement_that_uses_them():
    with pytest.raises(ValueError, match="emulated in the composed mode only"):
        RunConfig(devices=2, device_speeds=(1.0, 0.5), mode="processes")
    with pytest.raises(ValueError, match="emulated in the composed mode only"):
        BenchConfig(devices=(2,), device_speeds=(1.0, 0.5), mode="processes")
    with pytest.raises(ValueError, match="zigzag placement splits evenly"):
        RunConfig(devices=2, device_speeds=(1.0, 0.5), placement="zigzag")
    with pytest.raises(ValueError, match="give 2 speed"):
        BenchConfig(devices=(2, 4), device_speeds=(1.0, 0.5))  # one per device of every count
    assert RunConfig(devices=2, device_speeds=(1.0, 0.5)).resolved_mode() == "composed"
    assert RunConfig(devices=1, device_speeds=(1.0,), mode="processes").device_speeds == (1.0,)
    job = Job(method="astra", model_dir="-", artefact=None, inputs={},
              placement=PlacementConfig(2), class_tokens="none", new_tokens=1, link=LinkConfig(),
              timeout_s=10.0, overlap=True, use_tables=False, decoder=True,
              device_speeds=(1.0, 0.5))  # fmt: skip
    with pytest.raises(ValueError, match="emulated in the composed mode only"):
        run_ranks(job, 2, "processes")  # before any process starts


@pytest.mark.parametrize("argv,message", [
    (["run", "--device-speeds", "1,0.5,2"], "device speeds 1,0.5,2 give 3 speed(s) for 2"),
    (["run", "--device-speeds", "1,0"], "device speed 0.0 (in 1,0) must be a finite number > 0"),
    (["run", "--device-speeds", "1,inf"], "device speed inf (in 1,inf) must be a finite"),
    (["run", "--device-speeds", "1,fast"], "--device-speeds: expected comma-separated numbers"),
    (["run", "--device-speeds", "1,0.5", "--mode", "processes"], "composed mode only"),
    (["bench", "--device-speeds", "1,0.5"], "give 2 speed(s) for 4 devices"),
    (["bench", "--devices", "2", "--device-speeds", "1,nan"], "device speed nan (in 1,nan)"),
])  # fmt: skip
def test_bad_speeds_on_the_command_line_are_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err


def test_run_with_speeds_sizes_chunks_and_stays_exact(tiny_llama_dir):
    common = dict(model=str(tiny_llama_dir), devices=2, tokens=240, new_tokens=3,
                  methods=("single", "sp-fp32"), device_speeds=(1.0, 0.5))  # fmt: skip
    for placement in ("contiguous", "balanced"):
        config = RunConfig(placement=placement, **common)
        assert config.resolved_mode() == "composed"
        summary = run_inference(config, progress=False, log=lambda m: None)
        rows = {r["method"]: r for r in summary["records"]}
        sp = rows["sp-fp32"]
        # full precision whatever the split: the same greedy tokens as one device
        assert sp["generated_ids"] == rows["single"]["generated_ids"]
        assert sp["device_speeds"] == [1.0, 0.5] and "device_speeds" not in rows["single"]
        if placement == "contiguous":
            assert sp["tokens_per_device"] == [160, 80]  # in proportion to speed
        else:
            # equal cost / speed: the later, slower device gets well under half; the fitted
            # costs are those of a speed-1 device (timing-dependent, so only their form)
            assert sp["tokens_per_device"][0] >= 1.5 * sp["tokens_per_device"][1]
            assert all(sp["placement_cost"][k] >= 0 for k in ("cross", "diagonal", "rebuild"))


def test_torchrun_ranks_size_their_chunks_from_the_declared_speeds(tiny_llama_dir, tmp_path):
    """Under torchrun the devices are real: nothing is emulated, and the speeds size the
    placement (rank 0 declared twice as fast holds twice the tokens)."""
    import json
    import os
    import subprocess
    import sys

    from astra.models import load_model
    from astra.parallel.artefact import save_artefact
    from astra.parallel.config import AstraConfig
    from astra.parallel.simulate import apply_astra

    astra = apply_astra(load_model(tiny_llama_dir), AstraConfig(quant_point="kv", num_groups=1))
    for quantizer in astra.quantizers:  # timing codebooks: right shapes, arbitrary values
        for codebook in quantizer.codebooks:
            samples = torch.randn(2048, codebook.config.dim)
            codebook.kmeans_init_(samples, num_iters=0, init="random")
    artefact = save_artefact(tmp_path / "cb.safetensors", astra, tiny_llama_dir)
    out = tmp_path / "run.json"
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASTRA_SECRET_FILE": str(tmp_path / "token")}
    env.pop("ASTRA_SECRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "astra.cli.main", "run", "--model", str(tiny_llama_dir), "--tokens", "48",
           "--new-tokens", "3", "--artefact", str(artefact), "--bandwidth", "inf",
           "--latency", "0", "--device-speeds", "2,1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())["records"][0]
    assert record["mode"] == "torchrun" and record["device_speeds"] == [2.0, 1.0]
    assert record["tokens_per_device"] == [32, 16] and len(record["generated_ids"]) == 3
