"""`astra serve` as a user runs it: a real server process, real workers, the real openai client."""

from __future__ import annotations

import concurrent.futures
import os
import select
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from astra.net.launch import free_port

openai = pytest.importorskip("openai")


class Server:
    def __init__(self, *args: str, timeout_s: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "astra.cli.main", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + timeout_s
        while True:  # the ready line comes after the port is bound; never wait unbounded
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("astra serve was not ready in time")
            readable, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not readable:
                continue
            line = self.proc.stdout.readline()
            if "ready at" in line:
                self.ready_line = line
                break
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"astra serve exited with {self.proc.returncode}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # full precision on an ideal link, so greedy output must equal the single-device model's
    s = Server("--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--devices", "2",
               "--method", "sp-fp32", "--bandwidth", "inf", "--latency", "0",
               "--peer-timeout", "15", "--max-queue", "32")
    yield s
    s.stop()


def reference(tiny_llama_dir, prompt: str, n: int) -> str:
    from astra.models import load_tokenizer
    from tests.test_group import greedy_reference

    tok = load_tokenizer(tiny_llama_dir)
    return tok.decode(greedy_reference(tiny_llama_dir, tok(prompt)["input_ids"], n),
                      skip_special_tokens=True)


def test_ready_line_and_models(server):
    assert "127.0.0.1" in server.ready_line and "2 device(s)" in server.ready_line
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_is_the_single_device_greedy_output(server, tiny_llama_dir):
    prompt = "It is a truth universally acknowledged"
    out = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                              temperature=0)
    assert out.choices[0].text == reference(tiny_llama_dir, prompt, 8)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8
    astra = out.usage.model_extra["astra"]
    assert astra["method"] == "sp-fp32" and astra["devices"] == 2
    assert astra["ttft_ms"] > 0 and len(astra["bytes_sent_per_device"]) == 2


def test_streamed_completion_matches_the_whole_one(server):
    client = server.client()
    whole = client.completions.create(model="tiny", prompt="Emma Woodhouse", max_tokens=10,
                                      temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Emma Woodhouse",
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10  # include_usage: a last chunk with usage


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"


def test_chat_completion_plain_and_streamed(server):
    client = server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                         temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    streamed = "".join(p.choices[0].delta.content or "" for p in parts)
    assert streamed == out.choices[0].message.content


def test_concurrent_clients_lose_and_duplicate_nothing(server):
    prompts = [f"Chapter {i}: the" for i in range(8)]
    client = server.client(timeout=120)

    def ask(prompt: str) -> list[str]:
        return [client.completions.create(model="tiny", prompt=prompt, max_tokens=5,
                                          temperature=0).choices[0].text for _ in range(3)]

    expected = {p: ask(p)[0] for p in prompts[:2]}  # sequential answers to compare with
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(prompts, pool.map(ask, prompts)))
    assert len(answers) == 8
    for prompt, texts in answers.items():
        assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same text every time
        if prompt in expected:
            assert texts[0] == expected[prompt]  # nobody got another request's tokens


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt5", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context of 2048"):
        client.completions.create(model="tiny", prompt="word " * 3000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="embeddings needs a text encoder"):
        client.embeddings.create(model="tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=2)
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert "Traceback" not in r.text
    assert client.completions.create(model="tiny", prompt="still", max_tokens=2).choices


def test_a_client_that_leaves_cancels_its_tokens(server):
    def generated() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith("astra_completion_tokens_total")))

    before = generated()
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1900, "stream": True,
            "temperature": 0.7, "seed": 1}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leave after a few tokens
    client = server.client()
    client.completions.create(model="tiny", prompt="next", max_tokens=2)  # served after it
    assert generated() - before < 1900  # the abandoned request stopped early


def test_health_and_metrics_then_a_killed_worker(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["devices_alive"] == [True, True]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("astra_time_to_first_token_seconds_bucket", "astra_bytes_sent_total",
                 "astra_degraded 0.0", "astra_requests_total"):
        assert name in metrics
    os.kill(health["pids"][1], signal.SIGKILL)
    out = server.client(timeout=120).completions.create(model="tiny", prompt="After the fall",
                                                        max_tokens=3, temperature=0)
    assert len(out.choices[0].text) > 0
    assert out.usage.model_extra["astra"]["degraded"] is True
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "degraded" and health["devices_active"] == 1
    assert "astra_degraded 1.0" in httpx.get(f"{server.url}/metrics").text


def test_embeddings_equal_one_device_with_the_openai_client():
    from astra.hub import models_dir

    if not (models_dir() / "minilm-l6" / "config.json").is_file():
        pytest.skip("needs minilm-l6 (astra models prepare minilm-l6)")
    s = Server("--model", "minilm-l6", "--devices", "2", "--method", "sp-fp32",
               "--bandwidth", "inf", "--latency", "0")
    try:
        client = s.client()
        texts = ["A truth universally acknowledged.", "Emma Woodhouse, handsome, clever."]
        out = client.embeddings.create(model="minilm-l6", input=texts)  # base64 on the wire
        assert [d.index for d in out.data] == [0, 1]
        got = np.array([d.embedding for d in out.data])
        single = np.array(httpx.post(f"{s.url}/v1/embeddings", json={
            "model": "minilm-l6", "input": texts, "encoding_format": "float"}).json()["data"][0]
            ["embedding"])
        assert got.shape == (2, 384)
        np.testing.assert_allclose(got[0], single, atol=1e-5)
        # against the model on one process: sentence-transformers mean pooling
        import torch

        from astra.models import load_model, load_tokenizer

        path = models_dir() / "minilm-l6"
        model, tok = load_model(path), load_tokenizer(path)
        ids = torch.tensor([tok(texts[0])["input_ids"]])
        with torch.no_grad():
            ref = model(ids).mean(dim=1)[0].numpy()
        np.testing.assert_allclose(got[0], ref, atol=1e-4)
    finally:
        s.stop()


def test_queue_admission_is_bounded():
    from prometheus_client import CollectorRegistry

    from astra.serve.app import ApiError, GroupRunner
    from astra.serve.metrics import ServerMetrics

    class Idle:
        devices, degraded = 2, False
        _n = 0

        def new_request_id(self):
            self._n += 1
            return self._n

    runner = GroupRunner(Idle(), max_queue=2, metrics=ServerMetrics(CollectorRegistry(), Idle()))
    tickets = [runner.admit(retry_after_s=3) for _ in range(3)]  # one running + two waiting
    with pytest.raises(ApiError) as full:
        runner.admit(retry_after_s=3)
    assert full.value.status == 503 and full.value.headers == {"Retry-After": "3"}
    runner._done()
    assert runner.admit(retry_after_s=3).rid == len(tickets) + 1


def test_image_features_equal_one_device():
    """POST /v1/images/features on a ViT: 2 devices at full precision give one device's
    class-token features; a bad image is a 400 naming the field."""
    import base64
    import io

    import torch
    from PIL import Image

    from astra.hub import models_dir

    path = models_dir() / "dinov2-s"
    if not (path / "config.json").is_file():
        pytest.skip("needs dinov2-s (astra models prepare dinov2-s)")
    s = Server("--model", "dinov2-s", "--devices", "2", "--method", "sp-fp32",
               "--bandwidth", "inf", "--latency", "0")
    try:
        pixels = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        body = {"model": "dinov2-s", "image": base64.b64encode(buf.getvalue()).decode()}
        r = httpx.post(f"{s.url}/v1/images/features", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["data"][0]["embedding"])
        assert got.shape == (384,) and r.json()["usage"]["astra"][0]["devices"] == 2
        from astra.models import image_transform, load_model

        model = load_model(path)
        with torch.no_grad():
            ref = model(image_transform(path)(pixels)[None])[0, 0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)
        bad = httpx.post(f"{s.url}/v1/images/features", json={**body, "image": "not-base64!"})
        assert bad.status_code == 400 and "image" in bad.json()["error"]["message"]
    finally:
        s.stop()


def test_a_lossy_link_drops_codes_and_usage_counts_them(tiny_llama_dir):
    """`astra serve --loss`: packets are lost and never resent, the answer still comes, and
    usage.astra says how many remote tokens each device went without (seeded by the request,
    so the count is the same every run)."""
    s = Server("--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--devices", "2",
               "--method", "sp-fp32", "--bandwidth", "inf", "--latency", "0", "--loss", "0.3",
               "--parity", "0", "--peer-timeout", "15")
    try:
        assert "30% packet loss (no parity)" in s.ready_line
        prompt = "It is a truth universally acknowledged, " * 20
        out = s.client().completions.create(model="tiny", prompt=prompt, max_tokens=4,
                                            temperature=0)
        astra = out.usage.model_extra["astra"]
        assert out.usage.completion_tokens == 4
        assert sum(astra["lost_remote_tokens_per_device"]) > 0
    finally:
        s.stop()
