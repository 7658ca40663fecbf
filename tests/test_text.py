"""One tokenization rule (astra.text) for run, eval, calibrate and serve; user text in eval and
calibrate; the context checks; the Moby-Dick text."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from astra import datasets as ds
from astra.cli.main import main
from astra.models import load_tokenizer
from astra.text import encode, special_tokens, windows

BOS = 1  # SmolLM2's <|im_start|>, put first by the BOS-adding variant below

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.\nHowever little known the feelings or views of such a "
    "man may be on his first entering a neighbourhood, this truth is so well fixed in the minds "
    "of the surrounding families, that he is considered the rightful property of some one or "
    "other of their daughters.\n"
) * 6


def add_bos(model_dir) -> None:
    """Make the checkpoint's tokenizer put BOS before every text, the way Llama checkpoints'
    tokenizer.json do: a TemplateProcessing post-processor (and add_bos_token in the config)."""
    tok_file = model_dir / "tokenizer.json"
    spec = json.loads(tok_file.read_text())
    name = "<|im_start|>"
    bos = {"SpecialToken": {"id": name, "type_id": 0}}
    a, b = ({"Sequence": {"id": s, "type_id": i}} for i, s in enumerate("AB"))
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, a],
        "pair": [bos, a, b],
        "special_tokens": {name: {"id": name, "ids": [BOS], "tokens": [name]}},
    }
    tok_file.write_text(json.dumps(spec))
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["add_bos_token"] = True
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory):
    """{"plain": SmolLM2's tokenizer (adds nothing), "bos": a copy that adds BOS}, both on the
    tiny random Llama of conftest."""
    bos_dir = tmp_path_factory.mktemp("tiny-llama-bos") / "model"
    shutil.copytree(tiny_llama_dir, bos_dir)
    add_bos(bos_dir)
    return {"plain": tiny_llama_dir, "bos": bos_dir}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# -- the rule -----------------------------------------------------------------------------------


def test_special_tokens_follow_the_tokenizer(models):
    plain, bos = (load_tokenizer(models[k]) for k in ("plain", "bos"))
    assert special_tokens(plain) == ([], [])
    assert special_tokens(bos) == ([BOS], [])
    body = plain("Emma Woodhouse", add_special_tokens=False)["input_ids"]
    assert encode(plain, "Emma Woodhouse") == body
    assert encode(bos, "Emma Woodhouse") == [BOS, *body]


def test_bert_windows_keep_cls_and_sep():
    from astra.hub import models_dir

    d = models_dir() / "minilm-l6"
    if not (d / "tokenizer.json").is_file() and not (d / "vocab.txt").is_file():
        pytest.skip("needs the minilm-l6 tokenizer (astra models prepare minilm-l6)")
    tok = load_tokenizer(d)
    assert special_tokens(tok) == ([tok.cls_token_id], [tok.sep_token_id])
    w = windows(tok, TEXT, 16, 3, closed=True)
    assert w.shape == (3, 16)
    assert (w[:, 0] == tok.cls_token_id).all() and (w[:, -1] == tok.sep_token_id).all()
    body = ds.token_blocks(tok, TEXT, 14, 3)  # what the embedding task built by hand before
    assert torch.equal(w[:, 1:-1], body)


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_windows_start_with_bos_only_when_the_tokenizer_adds_one(models, kind):
    tok = load_tokenizer(models[kind])
    w = windows(tok, TEXT, 32, 4)
    assert w.shape == (4, 32) and w.dtype == torch.long
    if kind == "bos":
        assert (w[:, 0] == BOS).all()
        assert torch.equal(w[:, 1:], ds.token_blocks(tok, TEXT, 31, 4))  # contiguous text
    else:
        assert torch.equal(w, ds.token_blocks(tok, TEXT, 32, 4))  # as before: no BOS
    special = r" \(4095 of text \+ 1 special\)" if kind == "bos" else "$"
    with pytest.raises(ValueError, match="too few for one window of 4096 tokens" + special):
        windows(tok, TEXT, 4096)


@pytest.mark.parametrize("kind", ["plain", "bos"])
def test_run_eval_and_serve_tokenize_a_prompt_alike(models, kind, tmp_path):
    """The same text gives the same ids in `astra run --prompt`, an `astra eval --text` window
    and a `/v1/completions` prompt (Group.encode_prompt), with and without BOS."""
    from astra.group import Group, GroupConfig
    from astra.runner import RunConfig, build_inputs
    from astra.tasks import LanguageModeling, TaskConfig

    model_dir = models[kind]
    prompt = TEXT.rstrip("\n")
    run_ids = build_inputs(RunConfig(model=str(model_dir), prompt=prompt, tokens=1000), model_dir)
    run_ids = run_ids[0]["input_ids"][0].tolist()
    serve_ids = Group(GroupConfig(model=str(model_dir), devices=2)).encode_prompt(prompt)
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    task = LanguageModeling(None, model_dir, TaskConfig(seq_len=len(run_ids), text_file=str(path)))
    eval_ids = next(task.batches("test"))["input_ids"][0].tolist()
    assert run_ids == serve_ids == eval_ids
    assert (run_ids[0] == BOS) == (kind == "bos")
    # BOS is context, never a target: a window of T tokens scores its T - 1 successors
    logits = torch.zeros(1, len(eval_ids), 49152)
    _, count = task.score(logits, None, {"input_ids": torch.tensor([eval_ids])})
    assert count == len(eval_ids) - 1


# -- astra eval / calibrate --text --------------------------------------------------------------


def _no_model_load(monkeypatch):
    import astra.models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(astra.models, "load_model", refuse)


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (None, [], "--text {path}: no such file"),
        (b"", [], "--text {path} is empty"),
        (b"  \n\n", [], "--text {path} is empty (only whitespace)"),
        (b"caf\xe9 au lait " * 50, [], "--text {path} is not UTF-8 text (byte 0xe9 at offset 3)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", [], "is not UTF-8 text"),
        (b"Short text.", [], "the text has 3 tokens, too few for one window of 256 tokens"),
        (TEXT.encode(), ["--seq-len", "4096"], "--seq-len 4096 exceeds the model's context"),
    ],
)  # fmt: skip
def test_eval_text_problems_are_one_line_before_the_model_loads(
    models, tmp_path, monkeypatch, capsys, content, flags, message
):
    _no_model_load(monkeypatch)
    path = tmp_path / "mine.txt"
    if content is not None:
        path.write_bytes(content)
    for cmd in ("eval", "calibrate"):
        extra = ["--groups", "1"] if cmd == "calibrate" else []
        argv = [cmd, "--model", str(models["plain"]), "--text", str(path), *extra, *flags]
        assert main([*argv, "--no-progress"]) == 2
        line = _one_line(capsys)
        assert line.startswith("astra: error: ") and message.format(path=path) in line, line


def test_eval_seq_len_beyond_the_context_is_refused_without_text(models, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    assert main(["eval", "--model", str(models["plain"]), "--seq-len", "5000"]) == 2
    assert "use --seq-len 2048 or fewer" in _one_line(capsys)


def test_text_and_dataset_exclude_each_other(models, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(models["plain"]), "--text", "a.txt", "--dataset", "austen"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_eval_and_calibrate_on_the_users_text(models, tmp_path, capsys):
    """End to end on a tiny model: calibrate codebooks on a file, then measure perplexity on it
    at full precision and on 2 simulated devices."""
    text = tmp_path / "notes.txt"
    text.write_text(TEXT * 2, encoding="utf-8")
    art, report = tmp_path / "notes.safetensors", tmp_path / "ppl.json"
    common = ["--model", str(models["bos"]), "--text", str(text), "--seq-len", "32",
              "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(["calibrate", *common, "--groups", "1", "--codebook-size", "4",
                 "--sequences", "4", "--kmeans-iters", "1", "--out", str(art)]) == 0  # fmt: skip
    assert main(["eval", *common, "--artefacts", str(art), "--devices", "2",
                 "--limit", "3", "--json", str(report)]) == 0  # fmt: skip
    summary = json.loads(report.read_text())
    assert summary["task"] == "notes.txt-ppl" and summary["split"] == "whole file"
    assert summary["task_config"]["text_file"] == str(text)
    assert [r["devices"] for r in summary["rows"]] == [1, 2]
    assert all(math.isfinite(r["metric"]) and r["metric"] > 1 for r in summary["rows"])
    assert "| full precision |" in capsys.readouterr().out


# -- astra serve: a prompt longer than the context ----------------------------------------------


def test_serve_refuses_a_prompt_beyond_the_context_with_the_numbers(models):
    from fastapi.testclient import TestClient

    from astra.group import Group, GroupConfig
    from astra.serve.app import ServeConfig, create_app

    group = Group(GroupConfig(model=str(models["bos"]), devices=2))  # never started: refused first
    client = TestClient(create_app(group, ServeConfig(served_model_name="tiny")))
    prompt = "word " * 3000
    n = len(group.encode_prompt(prompt))
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        f"prompt of {n} tokens + max_tokens 4 = {n + 4} tokens exceeds the model's context of "
        "2048 tokens; shorten the prompt or lower max_tokens"
    )
    messages = [{"role": "user", "content": prompt}]
    if group.tokenizer.chat_template:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    body = {"model": "tiny", "prompt": [5] * 2045, "max_tokens": 4}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "2049 tokens exceeds" in r.json()["error"]["message"]


def test_serve_refuses_an_embedding_input_beyond_the_context():
    from fastapi.testclient import TestClient

    from astra.group import Group, GroupConfig
    from astra.hub import models_dir
    from astra.serve.app import ServeConfig, create_app

    if not (models_dir() / "minilm-l6" / "tokenizer.json").is_file():
        pytest.skip("needs minilm-l6 (astra models prepare minilm-l6)")
    group = Group(GroupConfig(model="minilm-l6", devices=2))  # never started: refused first
    client = TestClient(create_app(group, ServeConfig(served_model_name="mini")))
    r = client.post("/v1/embeddings", json={"model": "mini", "input": ["short", "word " * 600]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["param"] == "input"
    assert error["message"] == (
        "input of 602 tokens exceeds the model's context of 512 tokens; shorten the input"
    )  # [CLS] + 600 words + [SEP]


# -- the texts ----------------------------------------------------------------------------------


def test_read_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("\ufeffline one\r\nline two\r\n".encode())
    assert ds.read_text_file(f) == "line one\nline two\n"
    with pytest.raises(ValueError, match="is a directory"):
        ds.read_text_file(tmp_path)
    f.write_bytes(b"a\x00b")
    with pytest.raises(ValueError, match="NUL bytes"):
        ds.read_text_file(f)


def test_strip_gutenberg():
    raw = (
        "\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK "
        "X ***\r\n\r\nProduced by Someone\r\n\r\n\r\nTITLE\r\n\r\nText.\r\n\r\nEnd of Project "
        "Gutenberg's X\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence.\r\n"
    )
    assert ds.strip_gutenberg(raw) == "TITLE\n\nText.\n"
    with pytest.raises(ValueError, match="not a Project Gutenberg text"):
        ds.strip_gutenberg("just text")


def test_moby_dick_splits(tmp_path, monkeypatch):
    try:
        ds.moby_dick.cache_clear()
        novel = ds.moby_dick()
    except ds.DataNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    assert 1_150_000 < len(novel) < 1_300_000
    assert novel.startswith("MOBY DICK; OR THE WHALE\n") and "Gutenberg" not in novel[-5000:]
    assert "\r" not in novel and novel.rstrip().endswith("only found another\norphan.")
    parts = [ds.moby_dick_text(s) for s in ds.SPLITS]
    assert "".join(parts) == novel  # contiguous, disjoint, complete
    assert parts[1].startswith("CHAPTER ") and parts[2].startswith("CHAPTER ")
    assert 0.85 < len(parts[0]) / len(novel) < 0.95
    assert ds.builtin_text("moby-dick", "test") == parts[2]
    assert parts[2][2000:2200] not in parts[0]
    # a fresh ASTRA_HOME without the package's data names the set-up step
    ds.moby_dick.cache_clear()
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path))
    monkeypatch.setattr(ds, "MOBY_DICK_R_DIR", tmp_path / "none")
    monkeypatch.delenv("ASTRA_MOBY_DICK_DIR", raising=False)
    try:
        with pytest.raises(ds.DataNotFoundError, match="apt-get download r-cran-tokenizers"):
            ds.moby_dick()
    finally:
        ds.moby_dick.cache_clear()
