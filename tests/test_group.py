"""The library API: a persistent group of real worker processes against one device."""

from __future__ import annotations

import pytest
import torch

from astra.group import Group, GroupConfig, GroupError, LinkConfig, QuantConfig, RequestError
from astra.group.detokenize import Detokenizer
from astra.models import load_model
from astra.sampling import Sampler, Sampling

GREEDY = Sampling(max_tokens=6, temperature=0.0)


def greedy_reference(model_dir, ids: list[int], n: int) -> list[int]:
    """Plain full-sequence greedy decoding on one device, no cache: the slowest, surest way."""
    model = load_model(model_dir)
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


@pytest.fixture(scope="module")
def group(tiny_llama_dir):
    # every method on an ideal link: sp-fp32 must then match one device token for token
    config = GroupConfig(
        model=str(tiny_llama_dir),
        devices=2,
        method="sp-fp32",
        methods=("single", "sp-fp32", "astra"),
        link=LinkConfig(),
        warmup_tokens=16,
        peer_timeout_s=20,
    )
    with Group(config) as g:
        yield g


def test_full_precision_methods_match_one_device(group, tiny_llama_dir):
    prompt = "It is a truth universally acknowledged, that a single man"
    ids = group.encode_prompt(prompt)
    expected = greedy_reference(tiny_llama_dir, ids, 6)
    for method in ("single", "sp-fp32"):
        out = group.generate(prompt, GREEDY, method=method)
        assert out.token_ids == expected, method
        assert out.record.method == method
        assert out.record.completion_tokens == 6 and out.finish_reason == "length"
    sp = group.generate(prompt, GREEDY, method="sp-fp32").record
    assert sp.devices == 2 and sum(sp.tokens_per_device) == len(ids)
    assert sp.bytes_sent_per_device[0] > 0 and sp.bytes_sent_per_device[1] == 0  # streamed
    astra = group.generate(prompt, GREEDY, method="astra").record
    # ASTRA sends 10-bit codes: far fewer bytes than fp32 for the same tokens
    assert 0 < astra.bytes_sent_per_device[0] * 20 < sp.bytes_sent_per_device[0]
    assert (astra.groups, astra.codebook_size, astra.quant_point) == (1, 1024, "kv")


def test_stream_yields_the_same_text_as_generate(group):
    chunks = list(group.stream("Emma Woodhouse, handsome, clever", GREEDY))
    done = chunks.pop()
    assert "".join(c.text for c in chunks) == done.text
    assert done.text == group.generate("Emma Woodhouse, handsome, clever", GREEDY).text


def test_seeded_sampling_repeats_and_stop_strings_cut(group):
    s = Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = group.generate("Once upon a time", s)
    assert group.generate("Once upon a time", s).token_ids == first.token_ids
    word = first.text.strip().split(" ")[0] if first.text.strip() else None
    if word:  # stopping at the first word's text leaves what came before it
        cut = group.generate("Once upon a time", Sampling(8, 1.0, 0.9, 7, stop=(word,)))
        assert cut.text == first.text[: first.text.find(word)]
        assert cut.finish_reason == "stop"


def test_requests_that_cannot_run_are_refused_before_any_work(group):
    with pytest.raises(RequestError, match="exceeds the model's context"):
        group.generate([1] * 10, Sampling(max_tokens=10**6))
    with pytest.raises(RequestError, match="embeddings need a text encoder"):
        group.embed("hello")
    with pytest.raises(RequestError, match="empty"):
        group.generate([], GREEDY)


def test_a_prompt_shorter_than_the_group_runs_on_one_device(group):
    out = group.generate([1], GREEDY, method="sp-fp32")
    assert out.record.method == "single" and out.record.requested_method == "sp-fp32"
    assert out.record.fallback


def test_bad_configs_name_the_value():
    with pytest.raises(ValueError, match="cannot serve requests.*tp"):
        GroupConfig(method="tp")
    with pytest.raises(ValueError, match="peer_timeout_s must be a positive number"):
        GroupConfig(peer_timeout_s=float("nan"))
    with pytest.raises(ValueError, match="groups must be >= 1, got 0"):
        QuantConfig(groups=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0.0)


def test_hostile_sampling_values_are_refused_or_harmless(group):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        Sampling(seed=2**64)
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert Sampler(Sampling(temperature=1e-39, seed=0))(logits) == 1  # no NaN: the argmax
    with pytest.raises(RequestError, match="not prepared"):
        group.generate("x y z", GREEDY, method="sp-fp16")


def test_sampler_is_seeded_and_greedy_at_zero():
    logits = torch.randn(100)
    assert Sampler(Sampling(temperature=0.0))(logits) == int(logits.argmax())
    a = [Sampler(Sampling(seed=3))(logits) for _ in range(3)]
    assert len(set(a)) == 1
    # top_p keeps only the most likely token when it alone holds the mass
    peaked = torch.full((100,), -30.0)
    peaked[42] = 30.0
    assert {Sampler(Sampling(top_p=0.5, seed=s))(peaked) for s in range(5)} == {42}


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_detokenizer_holds_back_a_possible_stop_string():
    d = Detokenizer(_CharTokenizer(), ("END",))
    released = [d.push(ord(c)) for c in "abEN"]
    assert "".join(released) == "ab"  # "EN" could still become "END"
    assert d.push(ord("x")) == "ENx"  # it did not
    assert d.push(ord("E")) + d.push(ord("N")) + d.push(ord("D")) == ""
    assert d.stopped and d.text == "abENx"
    # the earliest stop string in the text wins, whatever its place in the list
    pieces = {0: "a", 1: ".\n"}  # one token that brings both stop strings at once

    class Pieces:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(pieces[i] for i in ids)

    d = Detokenizer(Pieces(), ("\n", "."))
    assert d.push(0) + d.push(1) == "a"
    assert d.stopped and d.text == "a"


def test_a_killed_device_fails_the_request_in_flight_and_the_group_reforms(tiny_llama_dir):
    import os
    import signal

    config = GroupConfig(
        model=str(tiny_llama_dir), devices=2, method="sp-fp32", methods=("single", "sp-fp32"),
        link=LinkConfig(), warmup_tokens=16, peer_timeout_s=10,
    )
    with Group(config) as g:
        victim = g.health()["pids"][1]
        # device 1 decodes (it holds the last token): kill it once it streams its first token
        with pytest.raises(GroupError, match=rf"device 1 \(pid {victim}\).*re-formed on 1 of 2"):
            for _ in g.stream("The cat sat", Sampling(max_tokens=2000, temperature=0.0)):
                os.kill(victim, signal.SIGKILL)
        health = g.health()
        assert health["status"] == "degraded" and health["devices_active"] == 1
        assert "exited with code -9" in health["failures"][0]
        out = g.generate("The cat sat", GREEDY)  # the next request is served, on one device
        assert out.record.method == "single" and out.record.degraded
        assert out.record.requested_method == "sp-fp32"


def test_fallback_auto_runs_one_device_when_the_link_makes_the_group_slower(tiny_llama_dir):
    def served_by(latency_ms: float) -> tuple[str, bool]:
        config = GroupConfig(
            model=str(tiny_llama_dir), devices=2, method="sp-fp32", methods=("single", "sp-fp32"),
            link=LinkConfig(latency_ms=latency_ms), fallback="auto", warmup_tokens=64,
        )
        with Group(config) as g:
            single_ms, group_ms = g.estimate_ms("sp-fp32", 64)
            assert single_ms > 0 and group_ms > 0
            record = g.generate([5] * 64, GREEDY).record
            return record.method, record.fallback

    # a second per message: two devices can never beat one on a tiny model
    assert served_by(1000.0) == ("single", True)


def test_a_frozen_device_is_named_and_the_group_carries_on(tiny_llama_dir):
    import os
    import signal

    config = GroupConfig(
        model=str(tiny_llama_dir), devices=2, method="sp-fp32", methods=("single", "sp-fp32"),
        link=LinkConfig(), warmup_tokens=16, peer_timeout_s=4,
    )
    with Group(config) as g:
        frozen = g.health()["pids"][1]
        os.kill(frozen, signal.SIGSTOP)  # the OS stops it: alive, silent
        try:
            with pytest.raises(GroupError, match=rf"device 1 \(pid {frozen}, stopped \(SIGSTOP\)"):
                g.generate("It was the best of times", GREEDY)
            out = g.generate("It was the best of times", GREEDY)
            assert out.record.degraded and out.record.method == "single"
        finally:
            try:
                os.kill(frozen, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_scores_through_the_runtime_equal_one_device_and_the_simulation(group, tiny_llama_dir):
    """Group.score: the perplexity of what is deployed. Full precision over two devices equals
    one device; ASTRA over two devices equals the single-process simulation of ASTRA."""
    from astra.parallel.artefact import load_astra
    from astra.parallel.passes import search_kind
    from astra.parallel.placement import PlacementConfig
    from astra.parallel.quantizer import set_search_
    from astra.tasks import TaskConfig, make_task

    astra = load_astra(group.artefact, load_model(tiny_llama_dir), tiny_llama_dir)
    # the simulation searches for codes as the runtime's senders do (bf16 where native)
    set_search_(astra.quantizers, search_kind(group.config.quant.search))
    task = make_task(astra.model, tiny_llama_dir, TaskConfig(seq_len=48))
    ids = task.token_blocks("test", 1)  # (1, 48)
    single = group.score(ids[0].tolist(), method="single")
    sp = group.score(ids[0].tolist(), method="sp-fp32")
    assert single.num_predicted == sp.num_predicted == 47
    assert sp.nll_sum == pytest.approx(single.nll_sum, rel=1e-5)
    with torch.no_grad():
        x = task.embed(astra.model, {"input_ids": ids})
        for placement in (None, PlacementConfig(2)):
            logits = task.outputs(astra.model, astra.forward_hidden(x, placement, None))
            expected, count = task.score(logits, None, {"input_ids": ids})
            got = single if placement is None else group.score(ids[0].tolist(), method="astra")
            assert got.nll_sum == pytest.approx(expected, rel=1e-4) and count == 47
    assert group.score(ids[0].tolist(), method="astra").perplexity > 1
