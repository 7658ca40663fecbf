"""`astra calibrate | finetune | eval` on tiny random Llamas saved as HF-format dirs.

The real tasks need prepared datasets and tokenizers; here a synthetic language-modelling task
(random token ids, no tokenizer) is swapped in through `astra_cmds.make_task`, so the commands
run end to end in seconds. NAQ being off at inference is tested in tests/test_parallel.py.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers

from astra import storage
from astra.cli import astra_cmds
from astra.cli.main import main
from astra.models import load_model
from astra.parallel.artefact import ArtefactMismatchError, load_astra, save_artefact
from astra.parallel.config import AstraConfig
from astra.parallel.placement import PlacementConfig
from astra.parallel.simulate import apply_astra
from astra.parallel.train import CHECKPOINT_KIND, calibrate_, evaluate, finetune
from astra.storage import load_tensors
from astra.tasks import LanguageModeling, TaskConfig

VOCAB = 97
DIM = 48  # quantized width: D=48 (hidden), 2 x Dkv = 2 x 16 (kv)


def tiny_llama_dir(path, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


class SyntheticLM(LanguageModeling):
    """Perplexity on fixed random token blocks: no tokenizer, no dataset."""

    def __init__(self, model, model_dir, config: TaskConfig):
        self.model_dir, self.config, self._blocks = model_dir, config, {}

    def token_blocks(self, split: str, limit: int | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        n = 8 if limit is None else min(limit, 8)
        return torch.randint(VOCAB, (n, self.config.seq_len), generator=gen)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """Two different tiny models A and B, artefacts kept under tmp_path, synthetic task."""
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(astra_cmds, "make_task", lambda m, d, c: SyntheticLM(m, d, c))
    return tiny_llama_dir(tmp_path / "a", 0), tiny_llama_dir(tmp_path / "b", 1)


def _small(*extra: str) -> list[str]:
    return ["--seq-len", "16", "--batch-size", "4", "--no-progress", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_artefact_for_another_model_is_refused(tiny, tmp_path, capsys):
    dir_a, dir_b = tiny
    astra = apply_astra(load_model(dir_a), AstraConfig(num_groups=1, codebook_size=4))
    art = save_artefact(tmp_path / "a.safetensors", astra, dir_a)
    with pytest.raises(ArtefactMismatchError, match="was made for the model with checksum"):
        load_astra(art, load_model(dir_b), dir_b)
    for cmd in (
        ["eval", "--model", str(dir_b), "--artefacts", str(art)],
        ["finetune", "--model", str(dir_b), "--init", str(art), "--steps", "1"],
    ):
        assert main(cmd + _small()) == 2
        line = _error_line(capsys)
        assert line.startswith("astra: error: ") and "was made for the model with checksum" in line
        assert "astra calibrate --model" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--groups", "5", "--point", "hidden"], "num_groups=5 must divide dim=48"),
        (["--groups", "1", "--codebook-size", "1"], "codebook_size must be >= 2"),
        (["--groups", "1", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--groups", "3", "--point", "kv"], "num_groups=3 must divide dim=16"),
    ],
)
def test_calibrate_bad_values_are_one_line(tiny, capsys, flags, message):
    dir_a, _ = tiny
    assert main(["calibrate", "--model", str(dir_a), *flags, *_small()]) == 2
    assert message in _error_line(capsys)


def test_calibrate_eval_round_trip_through_the_library(tiny):
    dir_a, _ = tiny
    model = load_model(dir_a)
    task = SyntheticLM(model, dir_a, TaskConfig(seq_len=16, batch_size=4))
    astra = apply_astra(model, AstraConfig(quant_point="kv", num_groups=2, codebook_size=8))
    report = calibrate_(astra, task, num_sequences=8, kmeans_iters=3, progress=False)
    errors = report["relative_error_per_block"]
    assert len(errors) == 2 and all(len(b) == 2 and 0 <= e < 1 for b in errors for e in b)
    art = save_artefact(dir_a.parent / "cal.safetensors", astra, dir_a)
    loaded = load_astra(art, load_model(dir_a), dir_a)
    full = evaluate(loaded, task, None, limit=4, progress=False)
    quantized = evaluate(loaded, task, PlacementConfig(4), limit=4, progress=False)
    assert math.isfinite(full) and math.isfinite(quantized) and quantized != full


def test_cli_calibrate_finetune_eval(tiny, tmp_path, capsys):
    dir_a, _ = tiny
    cal, ft = tmp_path / "cal.safetensors", tmp_path / "ft.safetensors"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(dir_a),
                "--groups",
                "2",
                "--codebook-size",
                "8",
                "--point",
                "kv",
                "--sequences",
                "8",
                "--out",
                str(cal),
                *_small(),
            ]
        )
        == 0
    )
    assert "relative quantization error" in capsys.readouterr().out
    assert (
        main(
            [
                "finetune",
                "--model",
                str(dir_a),
                "--init",
                str(cal),
                "--devices",
                "2",
                "--steps",
                "2",
                "--lr",
                "1e-3",
                "--placement",
                "mixed",
                "--out",
                str(ft),
                *_small(),
            ]
        )
        == 0
    )
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(dir_a),
                "--artefacts",
                str(cal),
                str(ft),
                "--devices",
                "1,4",
                "--limit",
                "4",
                "--json",
                str(out_json),
                *_small(),
            ]
        )
        == 0
    )
    assert "| ASTRA fine-tuned |" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["full precision"] + ["ASTRA calibrated"] * 2 + [
        "ASTRA fine-tuned"
    ] * 2
    assert all(math.isfinite(r["metric"]) for r in rows)
    # one device: no remote tokens, so the calibrated model is exactly full precision
    assert rows[1]["metric"] == pytest.approx(rows[0]["metric"], rel=1e-6)
    # whole model: 2 blocks x 2 codebooks (k, v) x G=2 x 3 bits; fp32: 2 x (2 x 16) x 32
    assert rows[1]["bits_per_token"] == 24 and rows[0]["bits_per_token"] == 2048
    assert rows[1]["compression"] == pytest.approx(2048 / 24)


class _Stop(Exception):
    pass


def _finetune(dir_a, checkpoint=None, on_checkpoint=None):
    model = load_model(dir_a)
    task = SyntheticLM(model, dir_a, TaskConfig(seq_len=16, batch_size=4))
    astra = apply_astra(model, AstraConfig(num_groups=2, codebook_size=8, noise_lambda=1.0))
    calibrate_(astra, task, num_sequences=8, kmeans_iters=2, progress=False)
    history = finetune(
        astra,
        task,
        num_devices=2,
        steps=4,
        lr=1e-3,
        placement_kind="mixed",
        checkpoint=checkpoint,
        checkpoint_every=1,
        progress=False,
        on_checkpoint=on_checkpoint,
    )
    return astra, history


def test_finetune_resumes_at_the_saved_step(tiny, tmp_path):
    dir_a, _ = tiny
    ckpt = tmp_path / "ft.ckpt"

    def interrupt(step):
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _finetune(dir_a, ckpt, interrupt)
    assert load_tensors(ckpt, CHECKPOINT_KIND)["step"] == 2
    resumed, history = _finetune(dir_a, ckpt)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    straight, straight_history = _finetune(dir_a)
    # same data, placements, NAQ noise and optimizer state: the resumed run is the straight run
    assert history[-1]["loss"] == pytest.approx(straight_history[-1]["loss"], abs=1e-6)
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_interrupted_mid_write_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    """Ctrl-C while step 3's checkpoint is being renamed into place: step 2's survives, no temp
    file is left, and the run resumes from it to the same result as an uninterrupted run."""
    dir_a, _ = tiny
    ckpt = tmp_path / "ft.ckpt"
    real_replace = os.replace

    def replace(src, dst):
        if load_tensors(src, CHECKPOINT_KIND)["step"] == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _finetune(dir_a, ckpt)
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert load_tensors(ckpt, CHECKPOINT_KIND)["step"] == 2
    assert [p.name for p in ckpt.parent.glob("*ft.ckpt*")] == ["ft.ckpt"]  # no temp left
    _, history = _finetune(dir_a, ckpt)
    _, straight = _finetune(dir_a)
    assert history[-1]["loss"] == pytest.approx(straight[-1]["loss"], abs=1e-6)


def test_eval_runtime_scores_real_processes_like_the_simulation(tiny, tmp_path, capsys):
    """`astra eval --runtime`: the same perplexity through two real worker processes."""
    dir_a, _ = tiny
    model = load_model(dir_a)
    astra = apply_astra(model, AstraConfig(quant_point="kv", num_groups=2, codebook_size=8))
    task = SyntheticLM(model, dir_a, TaskConfig(seq_len=16, batch_size=4))
    calibrate_(astra, task, num_sequences=8, progress=False)
    cal = save_artefact(tmp_path / "cal.safetensors", astra, dir_a)
    metrics = {}
    for flag in ((), ("--runtime",)):
        out = tmp_path / f"eval{len(flag)}.json"
        # 30 % packet loss, no parity: real packets dropped by the workers, predicted by the
        # simulation, the same ones for the same sequence
        argv = ["eval", "--model", str(dir_a), "--artefacts", str(cal), "--devices", "2",
                "--limit", "4", "--json", str(out), "--loss", "0,0.3", "--parity", "0",
                *flag, *_small()]
        assert main(argv) == 0
        rows = json.loads(out.read_text())["rows"]
        metrics[flag] = {(r["runtime"], r["loss"]): r["metric"] for r in rows if "runtime" in r}
    assert "| packet loss |" in capsys.readouterr().out
    for rate in (0, 0.3):
        assert metrics[()][("simulation", rate)] == pytest.approx(
            metrics[("--runtime",)][("processes", rate)], rel=1e-4)
    assert metrics[()][("simulation", 0.3)] != metrics[()][("simulation", 0)]
