"""`Group`: N worker processes that hold one model and serve requests, one at a time.

    from astra.group import Group, GroupConfig, Sampling
    with Group(GroupConfig(model="smollm2-135m", devices=2)) as group:
        out = group.generate("The capital of France is", Sampling(max_tokens=8, temperature=0))
        print(out.text, out.record.ttft_ms)

Starting costs once: the workers start, load the checkpoint, load (or calibrate and cache) the
codebooks and warm every method up. Each request then costs only its own compute and traffic.
`astra run` and `astra serve` are thin layers over this class.

Faults: every wait has a deadline. A device that dies, raises, or stops answering (its
heartbeat goes silent for `peer_timeout_s`) ends the request in flight with a GroupError that
names it; the group then re-forms on the survivors (one device fewer: new processes, since a
torch.distributed group cannot shrink) and marks itself degraded; with one device left it runs
every request as `single`. The next request is served by the re-formed group.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from astra.group.config import GroupConfig
from astra.group.detokenize import Detokenizer
from astra.group.records import RequestRecord, record_from_ranks
from astra.group.worker import WorkerSpec, WorkItem, serve_rank
from astra.hub import resolve_model
from astra.models import (
    context_length,
    image_transform,
    load_tokenizer,
    model_kind,
    model_spec,
    num_input_tokens,
    read_config,
)
from astra.net.launch import mp_context, process_state, start_ranks, stop_ranks
from astra.parallel.passes import search_kind
from astra.sampling import Sampling
from astra.text import encode

log = logging.getLogger("astra.group")
DEFAULT_SAMPLING = Sampling()  # 16 tokens at temperature 1 (OpenAI's defaults)


class GroupError(RuntimeError):
    """A device failed while serving a request (the group has re-formed by the time this is
    raised), or the group could not start."""


class RequestError(ValueError):
    """The request itself is invalid for this model (too long, wrong kind of input)."""


@dataclass
class Chunk:
    """A piece of a streamed completion: new text, and the token that completed it."""

    text: str
    token_id: int


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence or a stop string), "length", "cancelled"
    record: RequestRecord


@dataclass
class Encoding:
    """An encoder's output: a sentence embedding (text) or image features."""

    vector: list[float]
    record: RequestRecord


@dataclass
class Scoring:
    """A sequence's next-token negative log-likelihood, summed over every device's tokens."""

    nll_sum: float
    num_predicted: int  # tokens predicted (the sequence length minus one)
    record: RequestRecord

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(self.num_predicted, 1))


@dataclass
class _Members:
    """The processes of one incarnation of the group and their shared channels."""

    procs: list
    inboxes: list
    outbox: object
    cancel: object  # multiprocessing Value: the id of the request to cancel
    beats: object  # multiprocessing Array: each worker's last heartbeat (time.time())
    info: list[dict] = field(default_factory=list)  # each rank's "ready" report


class Group:
    def __init__(
        self, config: GroupConfig, progress: bool = False, warmup_inputs: dict | None = None
    ) -> None:
        """warmup_inputs: a representative input ({"input_ids"} or {"pixels"}) for the untimed
        warm-up passes (and the fitted placement); default: config.warmup_tokens of any tokens,
        or a 224 px image."""
        cores = os.cpu_count() or 1
        if config.devices * config.threads_per_device > 8 * cores:
            raise ValueError(
                f"devices={config.devices} x threads={config.threads_per_device} is more than "
                f"8x this machine's {cores} cores for real worker processes; `astra bench "
                "--mode composed` studies more devices than cores"
            )
        self.config = config
        self.progress = progress
        self.warmup_inputs = warmup_inputs
        self.model_dir = resolve_model(config.model)
        self.kind = model_kind(self.model_dir)  # "decoder", "text-encoder", "image-encoder"
        self.context_length = context_length(self.model_dir)
        self.tokenizer = _tokenizer_if_any(self.model_dir) if self.kind != "image-encoder" else None
        self.vocab_size = int(read_config(self.model_dir).get("vocab_size", 0))
        self.devices = config.devices  # active devices (fewer than asked after a failure)
        self.failures: list[str] = []  # what made the group re-form, oldest first
        self.artefact: Path | None = None
        self.quant_info: dict = {}
        self._members: _Members | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one request at a time through the group
        self._started = False
        self._closing = False

    # ---- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Group:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Group:
        """Start the workers (and calibrate codebooks first if none are cached)."""
        if self._started:
            return self
        if "astra" in self.config.methods and self.config.devices > 1:
            from astra.parallel.artefact import codebook_summary
            from astra.runner import ensure_codebooks

            self.artefact = ensure_codebooks(
                self.model_dir, self.config.quant, self.config.model, self.progress
            )
            self.quant_info = codebook_summary(self.artefact, self.model_dir)
        self._members = self._start_members(self.devices)
        self._started = True
        return self

    def close(self) -> None:
        self._closing = True  # a request still running must not re-form the group now
        members, self._members = self._members, None
        if members is not None:
            for inbox in members.inboxes:
                inbox.put(None)
            stop_ranks(members.procs, grace_s=2.0)
        self._started = False

    def _spec(self) -> WorkerSpec:
        c = self.config
        class_tokens = self.quant_info.get("class_tokens")
        if class_tokens is None:  # no codebooks: the model's own convention
            class_tokens = model_spec(self.model_dir).class_tokens
        return WorkerSpec(
            model_dir=str(self.model_dir),
            artefact=str(self.artefact) if self.artefact else None,
            methods=tuple(m for m in c.methods if m != "astra" or self.artefact is not None),
            placement=c.placement,
            class_tokens=class_tokens,
            exchange=c.exchange,
            remote_cache=c.remote_cache,
            overlap=c.overlap,
            use_tables=c.use_tables,
            dtype=c.dtype,
            weights=c.weights,
            search=c.quant.search,
            peer_timeout_s=c.peer_timeout_s,
            warmup_inputs=self._warmup_inputs(),
            owner_pid=os.getpid(),
        )

    def _warmup_inputs(self) -> dict:
        if self.warmup_inputs is not None:
            return self.warmup_inputs
        n = max(self.config.warmup_tokens, 2 * self.config.devices)
        if self.kind == "image-encoder":
            return {"pixels": torch.zeros(1, 3, 224, 224)}
        vocab = int(read_config(self.model_dir).get("vocab_size", 1000))
        ids = (torch.arange(n) * 7919 + 11) % vocab  # any tokens: only the shapes matter
        return {"input_ids": ids[None]}

    def _start_members(self, devices: int) -> _Members:
        c = self.config
        ctx = mp_context()
        inboxes = [ctx.Queue() for _ in range(devices)]
        outbox = ctx.Queue()
        # lock-free: a worker stopped while holding a lock would freeze the parent's checks
        cancel = ctx.Value("q", -1, lock=False)
        beats = ctx.Array("d", [time.time()] * devices, lock=False)
        procs = start_ranks(
            serve_rank,
            devices,
            args=(self._spec(), inboxes, outbox, cancel, beats),
            threads_per_worker=c.threads_per_device,
            backend=c.backend,
            collective_timeout_s=c.peer_timeout_s,
        )
        members = _Members(procs, inboxes, outbox, cancel, beats, [{}] * devices)
        deadline = time.monotonic() + c.start_timeout_s
        ready: dict[int, dict] = {}
        try:
            while len(ready) < devices:
                problem = self._problem(members, set(range(devices)) - set(ready), silence=False)
                if problem is None and time.monotonic() > deadline:
                    late = sorted(set(range(devices)) - set(ready))
                    problem = f"devices {late} were not ready after {c.start_timeout_s:g} s"
                if problem is not None:
                    raise GroupError(f"the device group did not start: {problem}")
                try:
                    msg = outbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if msg[0] == "ready":
                    ready[msg[1]] = msg[2]
                elif msg[0] == "error":
                    raise GroupError(f"the device group did not start: device {msg[1]}: {msg[3]}")
        except BaseException:
            stop_ranks(procs, grace_s=0.0)
            raise
        members.info = [ready[r] for r in range(devices)]
        return members

    def _problem(self, members: _Members, waiting: set[int], silence: bool = True) -> str | None:
        """The first device that died or stopped answering, in words; None if all are well.
        silence=False while starting: a worker beats only once it has joined the group."""
        now = time.time()
        for rank, proc in enumerate(members.procs):
            if proc.exitcode is not None and rank in waiting:
                return f"device {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
            if not silence:  # not beating yet, but a frozen process is frozen
                state = process_state(proc.pid)
                if state.startswith("stopped"):
                    return f"device {rank} (pid {proc.pid}, {state}) stopped answering"
                continue
            silent = now - members.beats[rank]
            # half the collective timeout: a frozen device is named by its silence before
            # its peers' collectives time out waiting for it (and blame each other)
            if silent > max(1.0, self.config.peer_timeout_s / 2):
                state = process_state(proc.pid)
                return (
                    f"device {rank} (pid {proc.pid}{', ' + state if state else ''}) stopped "
                    f"answering: no heartbeat for {silent:.1f} s (--peer-timeout "
                    f"{self.config.peer_timeout_s:g} s)"
                )
        return None

    def _reform(self, reason: str, drop_device: bool = True) -> None:
        """Drop the failed incarnation and start again, on one device fewer when a device
        failed (on as many when a request only ran out of time: its devices are still well)."""
        members, self._members = self._members, None
        if members is not None:
            stop_ranks(members.procs, grace_s=0.0)
        if self._closing:
            raise GroupError(f"{reason}; the group is closing")
        if not self.config.reform:
            self._closing = True
            raise GroupError(reason)
        self.failures.append(reason)
        if drop_device:
            self.devices = max(1, self.devices - 1)
        log.warning("astra: %s; re-forming the group on %d device(s)", reason, self.devices)
        self._members = self._start_members(self.devices)

    def heal(self) -> bool:
        """Re-form now if a device died or froze while the group was idle; True if it did."""
        if not self._started or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._members is None:  # the last re-forming failed: try again
                self._reform("the last re-forming failed", drop_device=False)
                return True
            problem = self._problem(self._members, set(range(self.devices)))
            if problem is None:
                return False
            self._reform(problem)
            return True
        except GroupError as exc:
            log.error("astra: %s", exc)
            return False
        finally:
            self._lock.release()

    # ---- state ------------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self.devices < self.config.devices

    def health(self) -> dict:
        members = self._members
        alive = [p.exitcode is None for p in members.procs] if members else []
        problem = self._problem(members, set(range(len(alive)))) if members else "not started"
        status = "ok"
        if problem is not None or not alive:
            status = "unavailable"
        elif self.degraded:
            status = "degraded"
        return {
            "status": status,
            "model": self.config.model,
            "kind": self.kind,
            "devices_requested": self.config.devices,
            "devices_active": self.devices,
            "devices_alive": alive,
            "pids": [p.pid for p in members.procs] if members else [],
            "degraded": self.degraded,
            "problem": problem,
            "failures": list(self.failures),
            "method": self.method_for(self.config.method),
        }

    def method_for(self, method: str) -> str:
        """The method a request asking for `method` runs with on the group as it is now."""
        if self.devices == 1:
            return "single"
        if method == "astra" and self.artefact is None:
            return "single"
        return method

    # ---- requests ---------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids as the tokenizer's own config says (BOS where the model expects one)."""
        if isinstance(prompt, str) and self.tokenizer is None:
            raise RequestError(f"model {self.config.model} has no tokenizer; send token ids")
        if isinstance(prompt, str):
            return encode(self.tokenizer, prompt)  # the rule run and eval use (astra.text)
        return list(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template applied to OpenAI-style messages, ready to continue."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.config.model} has no chat template; use completions")
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # jinja raises its own errors for messages it cannot render
            raise RequestError(f"messages: the chat template cannot render them ({exc})") from None
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        if self.kind != "decoder":
            raise RequestError(
                f"model {self.config.model} is a {self.kind}; text generation needs a decoder"
            )
        self._check_ids(ids)
        limit = self.context_length
        if limit is not None and len(ids) + max_tokens > limit:
            raise RequestError(
                f"prompt of {len(ids)} tokens + max_tokens {max_tokens} exceeds the model's "
                f"context of {limit} tokens"
            )

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def generate(
        self,
        prompt: str | list[int],
        sampling: Sampling = DEFAULT_SAMPLING,
        method: str | None = None,
        request_id: int | None = None,
        queued_at: float | None = None,
    ) -> Completion:
        """The whole completion of a text prompt or of token ids (see stream)."""
        out = None
        for event in self.stream(prompt, sampling, method, request_id, queued_at):
            if isinstance(event, Completion):
                out = event
        assert out is not None
        return out

    def stream(
        self,
        prompt: str | list[int],
        sampling: Sampling = DEFAULT_SAMPLING,
        method: str | None = None,
        request_id: int | None = None,
        queued_at: float | None = None,
    ) -> Iterator[Chunk | Completion]:
        """Chunks of text as the decode device draws tokens, then the Completion."""
        ids = self.encode_prompt(prompt)
        self.check_prompt(ids, sampling.max_tokens)
        eos = () if sampling.ignore_eos else self._eos_ids()
        stop_ids = tuple(t for t in eos if t is not None)
        inputs = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        rid = request_id if request_id is not None else self.new_request_id()
        text = Detokenizer(self.tokenizer, sampling.stop)
        tokens: list[int] = []
        record = None
        for event in self._run(inputs, sampling, method, rid, stop_ids, queued_at):
            if isinstance(event, RequestRecord):
                record = event
                break
            if text.stopped:
                continue
            tokens.append(event)
            delta = text.push(event)
            if text.stopped:
                self.cancel(rid)
            if delta:
                yield Chunk(delta, event)
        assert record is not None
        tail = text.flush()
        if tail:
            yield Chunk(tail, tokens[-1] if tokens else -1)
        finish = "stop" if text.stopped else record.finish_reason or "length"
        record.finish_reason = finish
        record.completion_tokens = len(tokens)
        yield Completion(text.text, tokens, finish, record)

    def encode(self, inputs: dict, method: str | None = None) -> Encoding:
        """An encoder's output for {"input_ids"} (text) or {"pixels"} (image)."""
        rid = self.new_request_id()
        record = None
        vector = None
        for event in self._run(inputs, Sampling(max_tokens=0), method, rid, (), None):
            if isinstance(event, RequestRecord):
                record = event
        assert record is not None
        vector = record.extra.pop("output")
        return Encoding(vector.float().tolist(), record)

    def score(self, ids: list[int], method: str | None = None) -> Scoring:
        """How well the model predicts a token sequence, through the real runtime: every
        device scores the successors of its own tokens after a distributed prefill (the
        accuracy of what is deployed, where `astra eval` scores the simulation)."""
        self.check_prompt(ids, 0)
        rid = self.new_request_id()
        inputs = {"input_ids": torch.tensor([ids], dtype=torch.long)}
        record = None
        for event in self._run(inputs, Sampling(max_tokens=0), method, rid, (), None, True):
            if isinstance(event, RequestRecord):
                record = event
        assert record is not None
        nll, count = record.extra.pop("nll_sum"), record.extra.pop("nll_count")
        return Scoring(nll, count, record)

    def embed(self, text: str, method: str | None = None) -> Encoding:
        if self.kind != "text-encoder":
            raise RequestError(
                f"model {self.config.model} is a {self.kind}; embeddings need a text encoder "
                "such as minilm-l6"
            )
        ids = self.encode_prompt(text)
        self._check_ids(ids)
        if self.context_length is not None and len(ids) > self.context_length:
            raise RequestError(
                f"input of {len(ids)} tokens exceeds the model's context of "
                f"{self.context_length} tokens"
            )
        return self.encode({"input_ids": torch.tensor([ids], dtype=torch.long)}, method)

    def features(self, image, method: str | None = None) -> Encoding:
        """Image features (the final-norm class token) of an HxWx3 array or PIL image."""
        if self.kind != "image-encoder":
            raise RequestError(
                f"model {self.config.model} is a {self.kind}; image features need a ViT such "
                "as dinov2-s"
            )
        pixels = image_transform(self.model_dir)(image)[None]
        return self.encode({"pixels": pixels}, method)

    def num_tokens(self, inputs: dict) -> int:
        return num_input_tokens(self.model_dir, inputs)

    def new_request_id(self) -> int:
        return next(self._ids)

    def cancel(self, request_id: int) -> None:
        """Stop drawing tokens for request_id (a prefill in progress finishes first)."""
        members = self._members
        if members is not None:
            members.cancel.value = request_id

    def _eos_ids(self) -> list[int | None]:
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok is not None else []
        gen = read_config(self.model_dir).get("eos_token_id")
        ids += gen if isinstance(gen, list) else [gen]
        return ids

    def _choose(self, method: str | None, prompt_tokens: int) -> tuple[str, bool]:
        """(method to run, whether the one-device fallback chose it)."""
        if method is not None and method not in self.config.methods:
            raise RequestError(
                f"method {method!r} was not prepared by this group; it has "
                f"{', '.join(self.config.methods)} (GroupConfig.methods)"
            )
        asked = self.method_for(method or self.config.method)
        if asked != "single" and prompt_tokens < self.devices:
            return "single", True  # every device needs a token of its own to share the work
        if self.config.fallback != "auto" or asked == "single":
            return asked, False
        single_ms, group_ms = self.estimate_ms(asked, prompt_tokens)
        if single_ms is not None and group_ms is not None and single_ms < group_ms:
            return "single", True
        return asked, False

    def estimate_ms(self, method: str, prompt_tokens: int) -> tuple[float | None, float | None]:
        """Predicted prefill time on one device and with `method` on the current link, from
        the warm-up passes: compute scaled by tokens, plus the link's latency per exchange the
        method waits for and its bytes at the current bandwidth."""
        info = self._members.info if self._members else []
        if not info or "single" not in info[0].get("warmup_prefill_ms", {}):
            return None, None
        scale = prompt_tokens / self.num_tokens(self._warmup_inputs())
        single_ms = info[0]["warmup_prefill_ms"]["single"] * scale
        per_rank = [i["warmup_prefill_ms"].get(method) for i in info]
        if any(t is None for t in per_rank):
            return single_ms, None
        link = self.config.link
        exchanges = (self.devices - 1) if self.kind == "decoder" else info[0]["num_blocks"]
        sent = max(i["warmup_bytes_per_token"].get(method, 0.0) for i in info) * prompt_tokens
        link_ms = exchanges * link.latency_ms + link.serialization_time_s(sent) * 1e3
        return single_ms, max(per_rank) * scale + link_ms

    def _run(self, inputs, sampling, method, rid, stop_ids, queued_at, score=False) -> Iterator:
        """Send one item to every device, yield token ids as they come, then the record."""
        with self._lock:
            started = time.perf_counter()
            queue_ms = (started - queued_at) * 1e3 if queued_at is not None else 0.0
            if not self._started:
                raise GroupError("the device group is not running (call start())")
            if self._members is None:  # the last re-forming failed: try again
                self._reform("the last re-forming failed", drop_device=False)
            problem = self._problem(self._members, set(range(self.devices)))
            if problem is not None:  # a device failed while the group was idle
                self._reform(problem)
            prompt_tokens = self.num_tokens(inputs)
            chosen, fallback = self._choose(method, prompt_tokens)
            item = WorkItem(
                request_id=rid,
                method=chosen,
                inputs=inputs,
                link=self.config.link,
                max_new_tokens=sampling.max_tokens,
                sampling=sampling,
                stop_ids=stop_ids,
                score=score,
            )
            members = self._members
            for inbox in members.inboxes:
                inbox.put(item)
            results: dict[int, dict | None] = {}
            try:
                yield from self._collect(members, rid, results)
            except GeneratorExit:  # the caller stopped listening: stop the devices drawing
                self.cancel(rid)
                raise
            record = self._record(chosen, results, prompt_tokens)
            record.queue_ms = round(queue_ms, 2)
            record.total_ms = round((time.perf_counter() - started) * 1e3, 2)
            record.fallback = fallback
            asked = method or self.config.method
            record.requested_method = asked if asked != chosen else None
            yield record

    def _collect(self, members: _Members, rid: int, results: dict) -> Iterator[int]:
        """Token ids of request rid as they arrive; every device's statistics into results."""
        deadline = time.monotonic() + self.config.request_timeout_s
        while len(results) < self.devices:
            problem = self._problem(members, set(range(self.devices)) - set(results))
            if problem is not None:
                self._fail(f"{problem} during request {rid}")
            if time.monotonic() > deadline:  # the devices are well, the request too long
                late = sorted(set(range(self.devices)) - set(results))
                self._fail(
                    f"request {rid} ran past --request-timeout "
                    f"{self.config.request_timeout_s:g} s; devices {late} had not finished",
                    drop_device=False,
                )
            try:
                msg = members.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            kind, rank = msg[0], msg[1]
            if msg[2] != rid:
                continue  # a late message of an earlier request
            if kind == "token":
                yield msg[3]
            elif kind == "done":
                results[rank] = msg[3]
            elif kind == "error":
                # a peer's failure often surfaces first as this device's broken
                # collective: give the cause a moment to show, and name it instead
                time.sleep(0.2)
                cause = self._problem(members, set(range(self.devices)) - {rank})
                self._fail(cause or f"device {rank} failed during request {rid}: {msg[3]}")

    def _fail(self, reason: str, drop_device: bool = True) -> None:
        devices = self.devices
        self._reform(reason, drop_device)
        raise GroupError(
            f"{reason}; the request was abandoned and the group re-formed on {self.devices} of "
            f"{devices} devices"
        )

    def _record(self, method: str, results: dict, prompt_tokens: int) -> RequestRecord:
        taking_part = [results[r] for r in sorted(results) if results[r] is not None]
        record = record_from_ranks(
            method,
            taking_part,
            mode="processes",
            dtype=self.config.dtype,
            search=search_kind(self.config.quant.search),
            prompt_tokens=prompt_tokens,
            weights=self.config.weights,
        )
        record.degraded = self.degraded
        first = next((r for r in taking_part if "generated" in r), None)
        if first is not None:
            record.finish_reason = first["finish_reason"]
        if method == "astra":
            record.groups = self.quant_info.get("groups")
            record.codebook_size = self.quant_info.get("codebook_size")
            record.quant_point = self.quant_info.get("quant_point")
        if any("nll_sum" in r for r in taking_part):
            record.extra["nll_sum"] = sum(r.get("nll_sum", 0.0) for r in taking_part)
            record.extra["nll_count"] = sum(r.get("nll_count", 0) for r in taking_part)
        output = next((r["output"] for r in taking_part if "output" in r), None)
        if output is not None:
            record.extra["output"] = output
        return record


def _tokenizer_if_any(model_dir: Path):
    """The checkpoint's tokenizer, or None for a directory without one (token ids only)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    return load_tokenizer(model_dir)

