"""The main job's library path (astra run) on a tiny checkpoint, composed mode."""

from __future__ import annotations

import pytest

from astra import runner
from astra.runner import RunConfig, run_inference


def test_run_inference_single_sp_and_astra(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "default_artefact", lambda model_dir, cfg: tmp_path / "cb.pt")
    config = RunConfig(model=str(tiny_llama_dir), devices=2, tokens=64, new_tokens=4,
                       methods=("single", "astra", "sp-fp32"), mode="composed")
    summary = run_inference(config, progress=False, log=lambda m: None)
    rows = {r["method"]: r for r in summary["records"]}
    assert set(rows) == {"single", "astra", "sp-fp32"}
    # full-precision sequence parallelism is exact: the same greedy tokens as one device
    assert rows["sp-fp32"]["generated_ids"] == rows["single"]["generated_ids"]
    assert len(rows["astra"]["generated_ids"]) == 4
    astra = rows["astra"]
    assert astra["tokens_per_device"] == [32, 32]
    # kv point, G=1, K=1024: 2 codes x 10 bits per token per block, 2 blocks, 1 peer
    assert max(astra["bytes_sent_per_device"]) == 2 * ((32 * 20 + 7) // 8)
    assert astra["kv_cache"]["remote_code_bytes"] == 2 * ((32 * 20) // 8)
    for key in ("ttft_ms", "tpot_ms", "speedup_vs_single", "speedup_vs_sp_fp32"):
        assert astra[key] is not None and astra[key] > 0
    assert "completion" in astra and (tmp_path / "cb.pt").is_file()


@pytest.mark.parametrize("kwargs,message", [
    (dict(devices=0), "devices must be >= 1"),
    (dict(tokens=4, devices=8), "tokens=4 must be >= devices=8"),
    (dict(methods=("magic",)), "each must be one of"),
    (dict(loss_rate=1.5), "loss rate must be in"),
    (dict(placement="spiral"), "placement kind 'spiral'"),
])
def test_run_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)
