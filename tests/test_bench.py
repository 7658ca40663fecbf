"""astra bench: records, outputs, and the composed mode held against real processes."""

from __future__ import annotations

import json

import pytest

from astra.bench import BenchConfig, run_bench, write_outputs


def _by_method(records):
    return {(r["method"], r["devices"]): r for r in records}


def test_bench_records_outputs_and_bytes(tiny_llama_dir, tmp_path):
    config = BenchConfig(
        model=str(tiny_llama_dir),
        devices=(2,),
        bandwidths_mbps=(10.0,),
        latency_ms=5.0,
        tokens=(64,),
        methods=("single", "astra", "sp-fp32", "tp", "pp", "bp"),
    )
    records = run_bench(config, progress=False)
    rows = _by_method(records)
    assert set(rows) == {
        ("single", 1),
        ("astra", 2),
        ("sp-fp32", 2),
        ("tp", 2),
        ("pp", 2),
        ("bp", 2),
    }
    # ASTRA kv point, G=1, K=1024: 2 codebooks x 10 bits per token, 2 blocks, to 1 peer
    assert rows[("astra", 2)]["bytes_per_device"] == 2 * ((32 * 2 * 10 + 7) // 8)
    # SP fp32 sends the 64-wide attention input of its 32 tokens per block
    assert rows[("sp-fp32", 2)]["bytes_per_device"] == 2 * 32 * 64 * 4
    assert rows[("bp", 2)]["changes_model"] and not rows[("tp", 2)]["changes_model"]
    assert rows[("single", 1)]["speedup_vs_single"] == 1.0
    # the work of splitting: every device's compute over one device's, stage by stage
    astra, single = rows[("astra", 2)], rows[("single", 1)]
    assert astra["work_vs_single"] == round(
        sum(astra["compute_ms_per_device"]) / single["compute_ms_per_device"][0], 4
    )
    assert {"project", "encode", "local_attention", "rebuild_remote", "remote_attention",
            "mlp_and_rest"} <= set(astra["work_breakdown_ms"])
    assert "wait" not in astra["work_breakdown_ms"] and single["work_breakdown_ms"] == {}
    assert sum(astra["work_breakdown_ms"].values()) == pytest.approx(
        sum(astra["compute_ms_per_device"]), rel=0.2)
    paths = write_outputs(records, tmp_path, "astra bench --test", config)
    meta = json.loads(paths[0].read_text())
    assert meta["command"] == "astra bench --test" and len(meta["records"]) == 6
    for key in (
        "method",
        "model",
        "devices",
        "tokens",
        "bandwidth_mbps",
        "latency_ms",
        "groups",
        "codebook_size",
        "total_ms",
        "compute_ms",
        "comm_ms",
        "bytes_per_device",
        "speedup_vs_single",
    ):
        assert key in meta["records"][1]
    assert "| astra G=1 K=1024 kv | 2 |" in paths[1].read_text()
    assert paths[2].suffix == ".png" and paths[2].stat().st_size > 1000


def test_composed_mode_matches_real_processes_at_two_devices(tiny_llama_dir):
    """Link-dominated runs (2 blocks, 200 ms per message, a tiny model whose compute is a few
    ms): the composed critical path must agree with real gloo processes within 20% + 20 ms,
    and the bytes exactly. The tolerance is below one message's latency, so a composed mode
    that dropped or doubled a message on any method's critical path fails."""
    latency = 200.0
    common = dict(
        model=str(tiny_llama_dir),
        devices=(2,),
        bandwidths_mbps=(1.0,),
        latency_ms=latency,
        tokens=(128,),
        methods=("astra", "sp-fp32", "pp"),
    )
    composed = _by_method(run_bench(BenchConfig(mode="composed", **common), progress=False))
    real = _by_method(run_bench(BenchConfig(mode="processes", **common), progress=False))
    for key, r in real.items():
        c = composed[key]
        assert c["bytes_per_device"] == r["bytes_per_device"], key
        assert abs(c["total_ms"] - r["total_ms"]) <= 0.2 * r["total_ms"] + 20, (key, c, r)
    # streamed ASTRA on 2 devices: exactly one message on the critical path, in both modes
    for rows in (composed, real):
        assert latency <= rows[("astra", 2)]["total_ms"] < 1.5 * latency, rows[("astra", 2)]


def test_bench_repeats_keep_the_median_pass_and_side_by_side_ratios(tiny_llama_dir):
    config = BenchConfig(
        model=str(tiny_llama_dir),
        devices=(2,),
        bandwidths_mbps=(10.0,),
        latency_ms=1.0,
        tokens=(32,),
        methods=("single", "astra"),
        repeats=3,
    )
    rows = _by_method(run_bench(config, progress=False))
    for row in rows.values():
        assert len(row["repeats_ms"]) == 3
        assert row["total_ms"] == sorted(row["repeats_ms"])[1]  # the median pass is kept
    single, astra = rows[("single", 1)], rows[("astra", 2)]
    assert astra["speedup_vs_single"] == round(single["total_ms"] / astra["total_ms"], 4)
    expected = [round(s / a, 4) for s, a in zip(single["repeats_ms"], astra["repeats_ms"])]
    assert astra["speedup_per_repeat"] == expected
    best = round(min(single["repeats_ms"]) / min(astra["repeats_ms"]), 4)
    assert astra["speedup_best"] == best


def test_bench_rejects_zero_repeats():
    import pytest

    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        BenchConfig(repeats=0)


def test_a_skipped_repeat_is_counted_not_timed():
    from astra.bench import _median_record

    runs = [{"method": "tp", "total_ms": 5.0}, {"method": "tp", "skipped": "peer died"},
            {"method": "tp", "total_ms": 3.0}]
    record = _median_record(runs)
    assert record["total_ms"] == 3.0 and record["repeats_ms"] == [5.0, 3.0]
    assert record["skipped_repeats"] == 1
    assert "skipped" in _median_record([runs[1], runs[1]])  # every repeat failed


def test_bench_times_the_cached_calibrated_codebooks_when_there_are_some(
    tiny_llama_dir, tmp_path, monkeypatch
):
    # timing depends on the codes (encoders attend to each distinct remote code once), so the
    # bench times what `astra run` would load; timing-only codebooks only when none is cached
    from astra.bench import bench_codebooks
    from astra.parallel.config import AstraConfig
    from astra.runner import RunConfig, build_inputs, default_artefact

    config = AstraConfig(quant_point="kv", num_groups=1, codebook_size=16)
    inputs, _, _ = build_inputs(RunConfig(model=str(tiny_llama_dir), tokens=16), tiny_llama_dir)
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path / "home"))  # an empty artefact cache
    notes: list[str] = []
    timing = bench_codebooks(tiny_llama_dir, config, inputs, tmp_path, 16, notes.append)
    assert timing.name == "timing-16.safetensors" and timing.is_file()
    assert len(notes) == 1 and "timing-only codebooks" in notes[0]
    cached = default_artefact(tiny_llama_dir, config)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(timing.read_bytes())
    assert bench_codebooks(tiny_llama_dir, config, inputs, tmp_path, 16, notes.append) == cached
    assert len(notes) == 1  # nothing to say
