"""Prometheus metrics of `astra serve` (GET /metrics), on the app's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from astra.group import Group, RequestRecord

# seconds; prefill on CPUs spans tens of ms (short prompts) to tens of s (SP at 10 Mbit/s)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, group: Group) -> None:
        self.group = group
        r = registry
        self.requests = Counter(
            "astra_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.rejected = Counter(
            "astra_rejected_queue_full", "requests refused with 503: queue full", registry=r
        )
        self.failures = Counter(
            "astra_device_failures", "requests abandoned because a device failed", registry=r
        )
        self.prompt_tokens = Counter("astra_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("astra_completion_tokens", "tokens generated", registry=r)
        self.fallbacks = Counter(
            "astra_fallback_single", "requests run on one device by --fallback auto", registry=r
        )
        self.ttft = Histogram(
            "astra_time_to_first_token_seconds",
            "prefill to the first token (encoders: output)",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "astra_time_per_output_token_seconds",
            "decoding time per token after the first",
            ["method"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "astra_queue_seconds",
            "time a request waited for the group",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_sent = Counter(
            "astra_bytes_sent", "payload bytes each device sent", ["device"], registry=r
        )
        self.bytes_received = Counter(
            "astra_bytes_received", "payload bytes each device received", ["device"], registry=r
        )
        self.queue_depth = Gauge(
            "astra_requests_pending", "requests admitted and not finished", registry=r
        )
        self.devices = Gauge("astra_devices_active", "devices in the group now", registry=r)
        self.degraded = Gauge(
            "astra_degraded", "1 while the group runs on fewer devices than asked", registry=r
        )

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe(self, record: RequestRecord, endpoint: str) -> None:
        self.count(endpoint, 200)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.completion_tokens)
        self.ttft.labels(record.method).observe(record.ttft_ms / 1e3)
        if record.tpot_ms is not None:
            self.tpot.labels(record.method).observe(record.tpot_ms / 1e3)
        self.queue.observe(record.queue_ms / 1e3)
        if record.fallback:
            self.fallbacks.inc()
        for device, (sent, received) in enumerate(
            zip(record.bytes_sent_per_device, record.bytes_received_per_device)
        ):
            self.bytes_sent.labels(str(device)).inc(sent)
            self.bytes_received.labels(str(device)).inc(received)

    def refresh(self) -> None:
        self.devices.set(self.group.devices)
        self.degraded.set(1 if self.group.degraded else 0)
