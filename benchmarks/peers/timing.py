"""The record every decoder peer writes: one prefill and its decoding, on both clocks."""

from __future__ import annotations


def decode_record(start, first, end, new_tokens: int, generated: list[int]) -> dict:
    """`start`, `first`, `end`: (perf_counter, thread_time) before the prefill, when the first
    token was drawn, and after the last one."""
    steps = max(new_tokens - 1, 1)
    return {
        "prefill_ms": (first[0] - start[0]) * 1e3,
        "tpot_ms": (end[0] - first[0]) * 1e3 / steps,
        "prefill_cpu_ms": (first[1] - start[1]) * 1e3,
        "tpot_cpu_ms": (end[1] - first[1]) * 1e3 / steps,
        "generated_ids": generated,
    }
