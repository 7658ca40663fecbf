"""The HTTP layer: OpenAI requests in, Group calls, OpenAI responses out. Nothing else.

One sequence at a time goes through the device group (every device works on it together);
requests wait in a FIFO queue of `max_queue` places, and a request that finds it full gets 503
with Retry-After. The group runs on one dedicated thread, so the event loop stays free to accept
requests, stream tokens and notice clients that leave: a client that disconnects cancels its
request (a queued one never starts; a running one stops drawing tokens after its prefill).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from astra.group import Completion, Group, GroupError, RequestError, RequestRecord
from astra.serve import protocol as wire
from astra.serve.metrics import ServerMetrics

log = logging.getLogger("astra.serve")


@dataclass(frozen=True)
class ServeConfig:
    served_model_name: str  # the name clients put in "model"
    max_queue: int = 16  # requests waiting for the group, beyond the one running
    default_max_tokens: int = 16  # OpenAI's default for completions
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    retry_after_s: int = 2  # advice to clients that found the queue full

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


class ApiError(Exception):
    """An error the client gets as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
        **headers,
    ):
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type_, code, headers
        self.param = param


class _Ticket:
    """One admitted request: its id in the group, when it queued, whether its client left."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.queued_at = time.perf_counter()
        self.cancelled = threading.Event()
        self.started = False  # the group has taken it: only then may it be cancelled there


class GroupRunner:
    """The FIFO in front of the group: admission (bounded), one thread running requests."""

    def __init__(self, group: Group, max_queue: int, metrics: ServerMetrics) -> None:
        self.group = group
        self.max_queue = max_queue
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astra-group")
        self.pending = 0  # admitted and not finished: queued + running
        self._lock = threading.Lock()

    def admit(self, retry_after_s: int) -> _Ticket:
        with self._lock:
            if self.pending > self.max_queue:
                self.metrics.rejected.inc()
                raise ApiError(
                    503,
                    f"the request queue is full ({self.max_queue} waiting behind one running); "
                    f"retry in {retry_after_s} s",
                    "server_busy",
                    "queue_full",
                    **{"Retry-After": str(retry_after_s)},
                )
            self.pending += 1
            self.metrics.queue_depth.set(self.pending)
        return _Ticket(self.group.new_request_id())

    def _done(self) -> None:
        with self._lock:
            self.pending -= 1
            self.metrics.queue_depth.set(self.pending)

    def submit(self, ticket: _Ticket, work: Callable[[], object]) -> asyncio.Future:
        """Run work() on the group's thread (unless its client left while it queued)."""

        def run():
            try:
                ticket.started = True  # before the check: cancel() sees one or the other
                if ticket.cancelled.is_set():
                    return None
                return work()
            finally:
                self._done()

        return asyncio.get_running_loop().run_in_executor(self.executor, run)

    async def watch(self, every_s: float = 1.0) -> None:
        """While no request runs, let the group replace a device that died or froze, so
        /health recovers and the next request does not pay for the re-forming."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            if self.pending == 0:
                await loop.run_in_executor(self.executor, self.group.heal)

    def cancel(self, ticket: _Ticket) -> None:
        """A queued request never starts; a running one stops drawing tokens. The group has
        one cancel slot, so a request that has not started must not touch it (it would
        overwrite the running request's cancel)."""
        if ticket.cancelled.is_set():
            return
        ticket.cancelled.set()
        if ticket.started:
            self.group.cancel(ticket.rid)


def create_app(group: Group, config: ServeConfig) -> FastAPI:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry, group)
    runner = GroupRunner(group, config.max_queue, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(runner.watch())
        yield
        watcher.cancel()

    app = FastAPI(
        title="Astra",
        description="ASTRA multi-device inference behind the OpenAI API",
        version="1",
        lifespan=lifespan,
    )
    name = config.served_model_name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.count(request.url.path, exc.status)
        return JSONResponse(
            wire.error_body(str(exc), exc.type, exc.code, exc.param),
            exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.count(request.url.path, 400)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            where = ""
            message = f"the body is not valid JSON: {first.get('msg')}"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
            if "input" in first and where and first.get("type") != "missing":
                message += f" (got {json.dumps(first['input'], default=str)[:80]})"
        return JSONResponse(
            wire.error_body(message, "invalid_request_error", param=where or None), 400
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        """A bug of ours, not the client's: one line in the log, an OpenAI body, no traceback
        to the client, and the server stays up."""
        metrics.count(request.url.path, 500)
        log.error("astra serve: %s on %s: %s", type(exc).__name__, request.url.path, exc)
        return JSONResponse(
            wire.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        metrics.count(request.url.path, exc.status_code)
        return JSONResponse(
            wire.error_body(str(exc.detail), "invalid_request_error"), exc.status_code
        )

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                metrics.count(request.url.path, 401)
                return JSONResponse(
                    wire.error_body(
                        "missing or wrong API key (send Authorization: Bearer <key>)",
                        "authentication_error",
                        "invalid_api_key",
                    ),
                    401,
                )
        return await call_next(request)

    def check_model(model: str) -> None:
        if model != name:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {name!r}",
                "invalid_request_error",
                "model_not_found",
            )

    def bad_request(exc: Exception) -> ApiError:
        return ApiError(400, str(exc), "invalid_request_error")

    def check_context(prompt_tokens: int, max_tokens: int, param: str) -> None:
        """Before the request queues: the prompt and the tokens to generate fit the context.
        OpenAI's code and param, and the numbers, so a client can cut its prompt to fit."""
        limit = group.context_length
        if limit is None or prompt_tokens + max_tokens <= limit:
            return
        noun = "input" if param == "input" else "prompt"
        what = f"{noun} of {prompt_tokens} tokens" + (
            f" + max_tokens {max_tokens} = {prompt_tokens + max_tokens} tokens"
            if max_tokens
            else ""
        )
        fix = f"shorten the {noun}" + (" or lower max_tokens" if max_tokens else "")
        raise ApiError(
            400,
            f"{what} exceeds the model's context of {limit} tokens; {fix}",
            "invalid_request_error",
            "context_length_exceeded",
            param,
        )

    @app.get("/health")
    async def health():
        state = group.health()
        return JSONResponse(state, 200 if state["status"] in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def prometheus():
        metrics.refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        h = group.health()
        card = {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "astra",
            "astra": {
                "kind": group.kind,
                "devices": h["devices_active"],
                "method": h["method"],
                "bandwidth_mbps": _finite(group.config.link.bandwidth_mbps),  # None: no limit
                "latency_ms": group.config.link.latency_ms,
                "context_length": group.context_length,
            },
        }
        return {"object": "list", "data": [card]}

    async def generate(request: Request, body: wire._Sampled, ids: list[int], chat: bool):
        try:
            sampling = body.sampling(config.default_max_tokens)
        except (RequestError, ValueError) as exc:
            raise bad_request(exc) from None
        if group.kind == "decoder":  # an encoder is refused below, for what it is
            check_context(len(ids), sampling.max_tokens, "messages" if chat else "prompt")
        try:
            group.check_prompt(ids, sampling.max_tokens)
        except (RequestError, ValueError) as exc:
            raise bad_request(exc) from None
        ticket = runner.admit(config.retry_after_s)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{ticket.rid}"
        path = request.url.path
        if body.stream:
            # submitted here, not in the response body: a client that leaves before the body
            # starts still releases its place in the queue when the work finishes
            events: asyncio.Queue = asyncio.Queue()
            future = runner.submit(ticket, stream_work(ticket, ids, sampling, events, path))
            return EventSourceResponse(
                stream_events(ticket, future, events, rid, chat, body.include_usage, path),
                ping=15,
            )
        work = lambda: group.generate(ids, sampling, None, ticket.rid, ticket.queued_at)  # noqa: E731
        out: Completion = await wait_for(request, ticket, runner.submit(ticket, work), path)
        metrics.observe(out.record, path)
        finish = wire.finish_reason(out.finish_reason)
        if chat:
            return wire.chat_body(rid, name, out.text, finish, out.record)
        return wire.completion_body(rid, name, out.text, finish, out.record)

    async def wait_for(request: Request, ticket: _Ticket, future: asyncio.Future, path: str):
        """The work's result; cancel it if the client disconnects first."""
        while not future.done():
            done, _ = await asyncio.wait([future], timeout=0.25)
            if not done and await request.is_disconnected():
                runner.cancel(ticket)
        try:
            result = future.result()
        except GroupError as exc:
            metrics.failures.inc()
            raise ApiError(
                503, str(exc), "server_error", "device_failure", **{"Retry-After": "1"}
            ) from None
        if result is None:  # cancelled before it started; nobody is listening
            raise ApiError(499, "client closed the request", "cancelled")
        return result

    def stream_work(ticket, ids, sampling, events: asyncio.Queue, path: str):
        """The group's side of a stream: each event onto the loop's queue."""
        loop = asyncio.get_running_loop()

        def work():
            try:
                for event in group.stream(ids, sampling, None, ticket.rid, ticket.queued_at):
                    if isinstance(event, Completion):  # counted even if the client has left
                        metrics.observe(event.record, path)
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except Exception as exc:  # reported in the stream, as OpenAI does
                loop.call_soon_threadsafe(events.put_nowait, exc)
            return True

        return work

    async def stream_events(ticket, future, events, rid, chat, include_usage, path):
        finished = False
        try:
            if chat:
                yield _sse(wire.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None))
            while True:
                if future.done() and events.empty():
                    break
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue
                if isinstance(event, Exception):
                    if isinstance(event, GroupError):
                        metrics.failures.inc()
                    metrics.count(path, 503)
                    yield _sse(wire.error_body(str(event), "server_error", "device_failure"))
                    break
                if isinstance(event, Completion):
                    finish = wire.finish_reason(event.finish_reason)
                    if chat:
                        yield _sse(wire.chat_chunk(rid, name, {}, finish))
                    else:
                        yield _sse(wire.completion_chunk(rid, name, "", finish))
                    if include_usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield _sse(wire.usage_chunk(rid, name, obj, event.record))
                    finished = True
                    continue
                if chat:
                    yield _sse(wire.chat_chunk(rid, name, {"content": event.text}, None))
                else:
                    yield _sse(wire.completion_chunk(rid, name, event.text, None))
            if finished:
                yield {"data": "[DONE]"}
        finally:
            if not finished:  # the client left (or the group failed): stop drawing tokens
                runner.cancel(ticket)

    @app.post("/v1/completions")
    async def completions(request: Request, body: wire.CompletionRequest):
        check_model(body.model)
        try:
            ids = group.encode_prompt(body.prompt)
        except (RequestError, ValueError) as exc:
            raise bad_request(exc) from None
        return await generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: wire.ChatRequest):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = group.chat_prompt(messages)
        except (RequestError, ValueError) as exc:
            raise bad_request(exc) from None
        return await generate(request, body, ids, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: wire.EmbeddingRequest):
        check_model(body.model)
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]  # one input given as token ids
        if group.kind != "text-encoder":
            raise bad_request(
                RequestError(
                    f"model {name!r} is a {group.kind}; /v1/embeddings needs a text "
                    "encoder (astra serve --model minilm-l6)"
                )
            )
        for text in inputs:  # every input before any work: one too long refuses the request
            try:
                ids = group.encode_prompt(text) if isinstance(text, str) else list(text)
            except (RequestError, ValueError) as exc:
                raise bad_request(exc) from None
            check_context(len(ids), 0, "input")
        data, records = [], []
        for i, text in enumerate(inputs):
            ticket = runner.admit(config.retry_after_s)
            work = lambda text=text: group.embed(text)  # noqa: E731
            try:
                out = await wait_for(request, ticket, runner.submit(ticket, work), request.url.path)
            except RequestError as exc:
                raise bad_request(exc) from None
            metrics.observe(out.record, request.url.path)
            vector = wire.vector_payload(out.vector, body.encoding_format)
            data.append({"object": "embedding", "index": i, "embedding": vector})
            records.append(out.record)
        return {"object": "list", "data": data, "model": name, "usage": _sum_usage(records)}

    @app.post("/v1/images/features")
    async def image_features(request: Request, body: wire.ImageFeaturesRequest):
        """Astra's own endpoint for ViT models: a base64 image in, its features out."""
        check_model(body.model)
        if group.kind != "image-encoder":
            raise bad_request(
                RequestError(
                    f"model {name!r} is a {group.kind}; image features need a ViT "
                    "(astra serve --model dinov2-s)"
                )
            )
        image = _decode_image(body.image)
        ticket = runner.admit(config.retry_after_s)
        work = lambda: group.features(image)  # noqa: E731
        out = await wait_for(request, ticket, runner.submit(ticket, work), request.url.path)
        metrics.observe(out.record, request.url.path)
        return {
            "object": "list",
            "data": [{"object": "features", "index": 0, "embedding": out.vector}],
            "model": name,
            "usage": _sum_usage([out.record]),
        }

    app.state.runner = runner
    app.state.metrics = metrics
    return app


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _sse(obj: dict) -> dict:
    return {"data": json.dumps(obj)}


def _sum_usage(records: list[RequestRecord]) -> dict:
    tokens = sum(r.prompt_tokens for r in records)
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "astra": [r.to_dict() for r in records],
    }


def _decode_image(text: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        raw = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(raw)).convert("RGB")
    except (
        binascii.Error,
        ValueError,
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombError,
    ) as exc:
        raise ApiError(
            400, f"image: not a base64-encoded PNG or JPEG ({exc})", "invalid_request_error"
        ) from None
    return np.asarray(image)
