"""Dynamic bandwidth: traces, the link fit, the closed-loop replay and the adaptive policy."""

from __future__ import annotations

import pytest

from astra.trace import (
    AdaptivePolicy,
    BandwidthTrace,
    LinkFit,
    MeasuredTimes,
    fit_link,
    markov_trace,
    read_trace_csv,
    replay,
)


def test_markov_trace_is_seeded_stays_in_range_and_moves_mostly_to_neighbours():
    a, b = markov_trace(600, seed=3), markov_trace(600, seed=3)
    assert a == b and markov_trace(600, seed=4) != a
    assert set(a.mbps) <= {20.0, 40.0, 60.0, 80.0, 100.0} and len(a.mbps) == 600
    jumps = [abs(y - x) for x, y in zip(a.mbps, a.mbps[1:]) if y != x]
    assert 60 < len(jumps) < 180  # stays 80 % of the steps
    assert sum(j == 20 for j in jumps) > sum(j >= 60 for j in jumps)  # nearby states likelier
    assert a.at(0.5) == a.mbps[0] and a.at(599.9) == a.mbps[-1]


def test_csv_trace_and_its_errors(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("time,mbps\n0,50\n10,20\n20,100\n")
    trace = read_trace_csv(f)
    assert trace.at(9.9) == 50 and trace.at(10) == 20 and trace.duration_s == 30
    f.write_text("0,50\n5,fast\n")
    with pytest.raises(ValueError, match=r"t.csv:2: expected 'time,mbps' numbers"):
        read_trace_csv(f)
    with pytest.raises(ValueError, match="must be positive"):
        BandwidthTrace((0.0,), (-1.0,), 1.0, "x")
    with pytest.raises(FileNotFoundError, match="no trace file"):
        read_trace_csv(tmp_path / "missing.csv")


def test_fit_recovers_compute_plus_bytes_over_bandwidth():
    fit = fit_link([(m, 2.0 + 30.0 / m) for m in (20, 40, 60, 80, 100)])
    assert fit.compute_s == pytest.approx(2.0) and fit.transfer_s_mbps == pytest.approx(30.0)
    assert fit.max_residual < 1e-9
    flat = fit_link([(20, 1.0)])  # one device: no link term
    assert flat.seconds(5) == flat.seconds(500) == 1.0


def test_replay_counts_what_fits_in_the_trace():
    trace = BandwidthTrace((0.0, 10.0), (10.0, 100.0), 20.0, "two steps")
    fit = LinkFit(0.5, 10.0, 0.0)  # 1.5 s at 10 Mbit/s, 0.6 s at 100
    served = replay(trace, lambda now, seen: ("m", fit.seconds(now)))
    assert len(served) == 7 + 15  # 7 x 1.5 s = 10.5 s, then 9.5 s / 0.6 s
    assert served[7].mbps == 100.0 and served[-1].start_s + served[-1].seconds <= 20.0


def test_measured_times_interpolate_in_inverse_bandwidth():
    t = MeasuredTimes(((20.0, 3.0), (100.0, 1.0)))
    assert t.seconds(20) == 3.0 and t.seconds(100) == 1.0 and t.best_s == 1.0
    # halfway in 1/bandwidth between 1/20 and 1/100 is 1/33.3
    assert t.seconds(1 / ((1 / 20 + 1 / 100) / 2)) == pytest.approx(2.0)
    assert t.seconds(5) == 3.0 and t.seconds(1000) == 1.0  # the nearest measurement outside


def test_adaptive_takes_the_richest_g_whose_transfer_fits_above_the_floor():
    # compute 1 s for every G; transfer G x 0.5 Mbit: fits at 100 Mbit/s, not at 1 Mbit/s
    times = {
        g: MeasuredTimes(tuple((m, 1.0 + g * 0.5 / m) for m in (1.0, 10.0, 100.0)))
        for g in (1, 16, 32)
    }
    policy = AdaptivePolicy(times, min_groups=1, tolerance=0.10)
    assert policy.choose(100.0, None)[0] == "G=32"  # fast link: the richest
    assert policy.choose(10.0, None)[0] == "G=1"  # 32 and 16 would be 1.8x / 1.8x slower
    assert policy.choose(100.0, 1.0)[0] == "G=1"  # decides on what the last request saw
    assert AdaptivePolicy(times, min_groups=16).choose(1.0, None)[0] == "G=16"  # the floor
    with pytest.raises(ValueError, match="quality floor 64"):
        AdaptivePolicy(times, min_groups=64)


def test_trace_bench_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path):
    from astra.bench import BenchConfig
    from astra.trace_bench import TraceBenchConfig, run_trace_bench, write_trace_outputs

    bench = BenchConfig(model=str(tiny_llama_dir), devices=(2,), tokens=(64,),
                        methods=("single", "astra", "sp-fp32", "tp"), latency_ms=0.0)
    trace = BandwidthTrace((0.0, 1.0), (20.0, 100.0), 3.0, "two steps")
    config = TraceBenchConfig(bench=bench, groups_set=(1, 2), adaptive=True,
                              perplexity_sequences=1, perplexity_tokens=32)
    result = run_trace_bench(config, trace, log=lambda m: None)
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"single", "sp-fp32", "tp", "astra G=1", "astra G=2", "astra adaptive"}
    for label in ("single", "sp-fp32", "tp", "astra G=1"):
        assert rows[label]["served"] == len(result["requests"][label]) > 0
    # measured at both of the trace's rates; the fit goes through them
    assert sorted(m for m, _ in rows["sp-fp32"]["measured"]) == [20.0, 100.0]
    assert sum(rows["astra adaptive"]["chosen"].values()) == rows["astra adaptive"]["served"]
    assert rows["astra G=1"]["perplexity"] > 1 and "perplexity" in rows["astra adaptive"]
    paths = write_trace_outputs(result, tmp_path, "astra bench --trace test")
    assert all(p.is_file() for p in paths) and "astra adaptive" in paths[1].read_text()
