"""Bad input costs one line and exit status 2, before any work; a failed bench run exits 1."""

from __future__ import annotations

import json
import time

import pytest
import torch

from astra.cli.main import main
from astra.provenance import SPEED_FLAGS, cpu_label


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--timeout", "nan"], "--timeout: expected a positive, finite number of seconds, got nan"),
    (["--peer-timeout", "-1"], "--peer-timeout: expected a positive, finite number"),
    (["--loss", "1.5"], "--loss: expected a packet loss rate in [0, 1), got 1.5"),
    (["--parity", "-2"], "--parity: expected 0 (no parity) or more, got -2"),
    (["--devices", "0"], "--devices: expected a number >= 1, got 0"),
])  # fmt: skip
def test_bad_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code == 2
    err = _one_line(capsys)
    assert message in err and "(see `astra run --help`)" in err


def test_checked_before_any_work(tiny_llama_dir, tmp_path, capsys):
    model = ["--model", str(tiny_llama_dir), "--mode", "composed"]
    t0 = time.monotonic()
    # the tiny Llama was trained for 2048 positions
    assert main(["run", *model, "--tokens", "5000"]) == 2
    assert "--tokens 5000 + --new-tokens 16 = 5016 positions exceed the model's context of " \
           "2048" in _one_line(capsys)
    assert main(["run", *model, "--json", "/proc/astra.json"]) == 2
    assert "--json /proc/astra.json: cannot write in /proc" in _one_line(capsys)
    assert main(["bench", *model[:2], "--tokens", "3000"]) == 2
    assert "exceed the model's context of 2048" in _one_line(capsys)
    existing = tmp_path / "cb.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["calibrate", *model[:2], "--groups", "1", "--out", str(existing)]) == 2
    assert "already exists; pass --force to overwrite it" in _one_line(capsys)
    assert existing.read_bytes() == b"keep me"
    assert time.monotonic() - t0 < 30  # no calibration, no worker, no model pass ran


def test_codebooks_beyond_memory_are_refused_before_allocating(tiny_llama_dir, capsys):
    argv = ["run", "--model", str(tiny_llama_dir), "--mode", "composed",
            "--codebook-size", str(2**31), "--tokens", "32"]
    assert main(argv) == 2
    err = _one_line(capsys)
    assert f"--codebook-size {2**31} needs" in err and "GB of memory is available" in err


def test_bench_exits_1_when_a_method_fails_and_keeps_what_ran(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    # three pipeline stages over a two-block model cannot run; single can
    argv = ["bench", "--model", str(tiny_llama_dir), "--devices", "3", "--methods", "single,pp",
            "--tokens", "48", "--bandwidths", "10mbit", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "astra: error: 1 runs failed: pp x3:" in err
    meta = json.loads((out / "bench.json").read_text())
    assert any(r["method"] == "single" and "skipped" not in r for r in meta["records"])
    assert {"git_commit", "cpu", "cpu_isa", "cores", "torch", "command"} <= set(meta)
    # the kernel level and flags that tell two CPUs of one name apart (Zen 1 vs Zen 4 EPYC)
    assert meta["cpu_isa"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(meta["cpu_isa"]["flags"]) <= set(SPEED_FLAGS)


def test_cpu_label_names_the_instruction_set():
    record = {"cpu": "AMD EPYC", "cpu_isa": {"torch_capability": "AVX512", "family": "25",
                                             "model": "17", "flags": ["avx512f"]}}
    assert cpu_label(record) == "AMD EPYC (AVX512, family 25 model 17)"
    assert cpu_label({"cpu": "AMD EPYC"}) == "AMD EPYC"  # records from before cpu_isa


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_gets_one_note(monkeypatch, capsys, native):
    import astra.parallel.passes as passes
    from astra.cli.common import note_dtype

    monkeypatch.setattr(passes, "native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    note_dtype("bfloat16")
    note_dtype("float32")  # the default never gets a note
    err = capsys.readouterr().err
    if native:
        assert err == ""
    else:
        assert err.count("\n") == 1 and "no native bf16" in err and "slower than float32" in err
