"""The one result record: what a request (or a benchmark pass) did, where its time went, and
what it sent. `astra run --json`, `astra bench` JSON, the server's `usage.astra` and the
library API all carry this record, so a number means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    method: str  # the method that actually ran (after any fallback)
    devices: int  # devices that took part (1 for single)
    mode: str  # "processes" (real workers), "composed" (lockstep), "torchrun"
    dtype: str  # compute precision
    search: str | None  # ASTRA senders' search precision (None for other methods)
    ttft_ms: float  # prefill: request start to the first token (encoders: to the output)
    tpot_ms: float | None  # time per output token after the first (decoders)
    prompt_tokens: int
    completion_tokens: int = 0
    weights: str = "full"  # how the blocks' weights are stored: full, int8, int4
    queue_ms: float = 0.0  # waiting for the group before this request started
    total_ms: float = 0.0  # start to last token (excludes queue_ms)
    compute_ms_per_device: list[float] = field(default_factory=list)  # prefill, per device
    comm_ms_per_device: list[float] = field(default_factory=list)  # inside communicator calls
    wait_ms_per_device: list[float] = field(default_factory=list)  # of which blocked on peers
    bytes_sent_per_device: list[int] = field(default_factory=list)
    bytes_received_per_device: list[int] = field(default_factory=list)
    tokens_per_device: list[int] = field(default_factory=list)
    lost_remote_tokens_per_device: list[int] = field(default_factory=list)
    degraded: bool = False  # the group runs on fewer devices than asked (a device failed)
    fallback: bool = False  # ran on one device because its estimate beat the group's
    requested_method: str | None = None  # what was asked, when it differs from `method`
    groups: int | None = None  # G of the codebooks actually used (ASTRA)
    codebook_size: int | None = None  # K of the codebooks actually used (ASTRA)
    quant_point: str | None = None  # where ASTRA quantized ("hidden" or "kv")
    finish_reason: str | None = None  # "stop", "length", "cancelled" (decoders)
    extra: dict = field(default_factory=dict)  # method-specific: kv_cache, placement_cost, ...

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out


def record_from_ranks(
    method: str,
    results: list[dict],
    *,
    mode: str,
    dtype: str,
    search: str | None,
    prompt_tokens: int,
    weights: str = "full",
) -> RequestRecord:
    """Fold every participating device's statistics (runner/worker dicts) into one record."""
    comm = [r["comm"] for r in results]
    prefill = [c.get("phases", {}).get("prefill", c) for c in comm]
    first = next((r for r in results if "ttft_ms" in r), results[0])
    record = RequestRecord(
        method=method,
        devices=len(results),
        mode=mode,
        dtype=dtype,
        search=search if method == "astra" else None,
        weights=weights,
        # decoders: the device that drew the first token; encoders: the last device done
        ttft_ms=max(r["ttft_ms"] for r in results if "ttft_ms" in r)
        if any("ttft_ms" in r for r in results)
        else max(r["prefill_ms"] for r in results),
        tpot_ms=first.get("tpot_ms"),
        prompt_tokens=prompt_tokens,
        completion_tokens=len(first.get("generated", [])),
        bytes_sent_per_device=[int(c["bytes_sent"]) for c in comm],
        bytes_received_per_device=[int(c["bytes_received"]) for c in comm],
        comm_ms_per_device=[round(p["comm_ms"], 2) for p in prefill],
        wait_ms_per_device=[round(p["wait_ms"], 2) for p in prefill],
        compute_ms_per_device=[
            round(r["prefill_ms"] - p["comm_ms"], 2) for r, p in zip(results, prefill)
        ],
        tokens_per_device=[r["tokens"] for r in results],
        lost_remote_tokens_per_device=[r.get("lost_remote_tokens", 0) for r in results],
    )
    shares = [r.get("distinct_code_share") for r in results]
    if any(share is not None for share in shares):  # remote keys attended / remote tokens
        record.extra["distinct_code_share_per_device"] = shares
    for key in ("placement_cost", "kv_cache", "breakdown_ms"):
        value = next((r[key] for r in results if key in r), None)
        if value is not None:
            record.extra[key] = value
    return record
