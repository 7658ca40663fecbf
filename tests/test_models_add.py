"""`astra models add|remove`: your own checkpoint by name, wherever a model name works."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from astra import hub, runner
from astra.cli.main import main
from astra.parallel.config import AstraConfig


@pytest.fixture
def home(tiny_llama_dir, tmp_path, monkeypatch):
    """A fresh $ASTRA_HOME (after tiny_llama_dir, which reads the real one's tokenizer) that
    shares the real one's data sets."""
    data = hub.cache_dir() / "data"
    (tmp_path / "home").mkdir()
    if data.is_dir():
        (tmp_path / "home" / "data").symlink_to(data)
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def ckpt(tiny_llama_dir, tmp_path):
    """A copy of the tiny Llama that a test may change."""
    return shutil.copytree(tiny_llama_dir, tmp_path / "My-Llama")


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_add_dir_resolve_list_remove(home, ckpt, capsys):
    assert main(["models", "add", str(ckpt), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("my-llama: added in") and "--model my-llama" in out
    assert hub.resolve_model("my-llama") == ckpt.resolve()
    # registered where it is: nothing copied under $ASTRA_HOME
    assert not (home / "models").exists()
    entry = json.loads(hub.registry_path().read_text())["models"]["my-llama"]
    assert entry["kind"] == "dir" and entry["family"] == "llama"
    assert entry["checksum"] == hub.model_checksum(ckpt)  # the same key as the path gives
    assert set(entry["files"]) == {"model.safetensors"}

    assert main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "my-llama" in line)
    assert "llama" in row and "MB" in row and str(ckpt.resolve()) in row and "(added)" in row

    assert main(["models", "remove", "my-llama"]) == 0
    assert "left in place" in capsys.readouterr().out
    assert (ckpt / "model.safetensors").is_file()  # the user's own dir is never deleted
    with pytest.raises(hub.UnknownModelError, match="unknown model 'my-llama'"):
        hub.resolve_model("my-llama")
    assert main(["models", "remove", "my-llama"]) == 2
    assert "'my-llama' is not a model added with `astra models add`" in _one_line(capsys)


@pytest.mark.parametrize("case,message", [
    ("bad name", "invalid model name 'Bad Name!'"),
    ("default name", "invalid model name 'my llama'"),
    ("built-in", "model name 'smollm2-135m' is built in"),
    ("mamba", "unsupported model_type 'mamba'; supported: bert, dinov2, "),  # ... llama ...
    ("no config", "has no config.json"),
    ("missing", "no such file or directory"),
    ("not gguf", "neither an HF-format checkpoint directory nor a GGUF file"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2_before_any_work(home, ckpt, case, message, capsys):
    argv = ["models", "add", str(ckpt), "--quiet"]
    if case == "bad name":
        argv += ["--name", "Bad Name!"]
    elif case == "default name":
        argv[2] = str(ckpt.rename(ckpt.with_name("My Llama")))
    elif case == "built-in":
        argv += ["--name", "smollm2-135m"]
    elif case == "mamba":
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    elif case == "no config":
        (ckpt / "config.json").unlink()
    elif case == "missing":
        argv[2] = str(ckpt / "nope")
    elif case == "not gguf":
        argv[2] = str(ckpt / "config.json")
    t0 = time.monotonic()
    assert main(argv) == 2
    err = _one_line(capsys)
    assert err.startswith("astra models: error:") and message in err, err
    assert time.monotonic() - t0 < 5  # refused before loading or hashing anything
    assert not hub.registry_path().exists()


def test_existing_name_needs_force_and_wrong_weights_are_refused(home, ckpt, capsys):
    assert main(["models", "add", str(ckpt), "--name", "mine", "--quiet"]) == 0
    other = shutil.copytree(ckpt, ckpt.with_name("other"))
    assert main(["models", "add", str(other), "--name", "mine", "--quiet"]) == 2
    assert "model 'mine' already exists" in _one_line(capsys)
    assert hub.resolve_model("mine") == ckpt.resolve()
    capsys.readouterr()
    assert main(["models", "add", str(other), "--name", "mine", "--force", "--quiet"]) == 0
    assert hub.resolve_model("mine") == other.resolve()

    # weights that do not fit the config: refused with one line, nothing registered
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    assert main(["models", "add", str(other), "--name", "broken", "--quiet"]) == 2
    assert "weights do not load" in _one_line(capsys)
    assert "broken" not in json.loads(hub.registry_path().read_text())["models"]


def test_changed_weights_change_the_checksum_and_the_codebook_cache(home, ckpt, capsys):
    assert main(["models", "add", str(ckpt), "--name", "mine", "--quiet"]) == 0
    capsys.readouterr()
    config = AstraConfig(quant_point="kv", num_groups=1)
    before = hub.model_checksum(ckpt)
    key = runner.default_artefact(hub.resolve_model("mine"), config)
    # keyed by weights and settings, not by name: the path and the name share one cache file
    assert key == runner.default_artefact(ckpt, config)
    assert "my-llama" not in key.name and "mine" not in key.name
    assert key != runner.default_artefact(ckpt, AstraConfig(quant_point="kv", num_groups=2))

    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte flipped, same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert hub.model_checksum(ckpt) != before
    assert runner.default_artefact(ckpt, config) != key
    assert main(["models", "list"]) == 0
    assert "weights changed since add" in capsys.readouterr().out


def test_run_by_name_end_to_end(home, ckpt, tmp_path, capsys):
    assert main(["models", "add", str(ckpt), "--name", "tiny", "--quiet"]) == 0
    out = tmp_path / "run.json"
    argv = ["run", "--model", "tiny", "--mode", "composed", "--tokens", "32", "--new-tokens", "2",
            "--methods", "single,astra", "--codebook-size", "16", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert len(records["astra"]["generated_ids"]) == 2
    # the codebooks were calibrated once, cached under the weights' key in this $ASTRA_HOME
    cached = list((home / "artefacts").glob("calibrated-kv-g1-k16-*.safetensors"))
    assert len(cached) == 1


def _smollm2_gguf():
    pin = hub.KNOWN_MODELS["smollm2-135m"].package
    try:
        path = hub.package_dir(pin) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    except hub.MissingPackageError:
        pytest.skip(f"{pin.name} not installed")
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


@pytest.mark.slow
def test_add_gguf_converts_once(tmp_path, monkeypatch, capsys):
    gguf = _smollm2_gguf()
    builtin = hub.read_manifest(hub.models_dir() / "smollm2-135m")  # the real $ASTRA_HOME's
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path / "home"))
    assert main(["models", "add", str(gguf), "--quiet"]) == 0
    name = "smollm2-135m-instruct.q4_1"  # the file's name, lower-cased
    assert f"{name}: added" in capsys.readouterr().out
    target = hub.resolve_model(name)
    assert target == hub.models_dir() / name
    manifest = hub.read_manifest(target)
    assert manifest["source"]["gguf"] == str(gguf) and manifest["family"] == "llama"
    assert hub.verify_model(target, deep=True) == []
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert not [p for p in hub.models_dir().iterdir() if p.name.startswith(".")]  # no temp dirs
    if builtin is not None:  # the same weights as `astra models prepare`: one codebook cache
        assert manifest["checksum"] == builtin["checksum"]

    assert main(["models", "add", str(gguf), "--quiet"]) == 2  # existing name, no --force
    assert "already exists" in _one_line(capsys)
    assert main(["models", "list"]) == 0
    assert f"{target} (added)" in capsys.readouterr().out
    assert main(["models", "remove", name]) == 0
    assert not target.exists()  # a converted dir is ours to delete
