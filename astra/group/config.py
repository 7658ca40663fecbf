"""The library API's configuration: one dataclass per concern, each validated on construction.

- `LinkConfig` (astra.net.link): each device's emulated uplink (bandwidth, latency per message).
- `QuantConfig`: what ASTRA sends (G groups of K codes, the quantization point, the artefact).
- `GroupConfig`: the device group (model, devices, method, precision, placement, timeouts).
- `Sampling` (astra.sampling): how one request picks its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from astra.methods import GENERATING_METHODS
from astra.models.quantize import WEIGHTS
from astra.net.link import LinkConfig
from astra.parallel.config import QUANT_POINTS
from astra.parallel.placement import PlacementConfig
from astra.parallel.runtime import EXCHANGES, REMOTE_CACHES
from astra.precision import DTYPES, SEARCHES

FALLBACKS = ("off", "auto")


@dataclass(frozen=True)
class QuantConfig:
    """ASTRA's codebooks: K codes in each of G groups per token, at a quantization point."""

    groups: int = 1  # G
    codebook_size: int = 1024  # K (log2 K bits per group on the wire)
    point: str | None = None  # "hidden" or "kv"; None: the model's task default
    artefact: str | None = None  # codebooks from calibrate/finetune; None: calibrate and cache
    search: str = "auto"  # the senders' nearest-code search precision, one of SEARCHES

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.point is not None and self.point not in QUANT_POINTS:
            raise ValueError(f"quantization point {self.point!r} is not one of {QUANT_POINTS}")
        if self.search not in SEARCHES:
            raise ValueError(f"search {self.search!r} is not one of {SEARCHES}")


def _positive_seconds(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value}")


@dataclass(frozen=True)
class GroupConfig:
    """A persistent group of N devices that holds one model and serves many requests."""

    model: str = "smollm2-135m"  # a prepared model name or a local HF-format directory
    devices: int = 2  # N worker processes, each holding the whole model and T/N tokens
    method: str = "astra"  # the default method of requests, one of GENERATING_METHODS
    # every method requests may use; the workers prepare these once (codecs, warm-up)
    methods: tuple[str, ...] = ("single", "astra")
    link: LinkConfig = field(default_factory=lambda: LinkConfig(10.0, 20.0))
    quant: QuantConfig = field(default_factory=QuantConfig)
    dtype: str = "float32"
    # how each device stores its blocks' weights: "full" (as --dtype), "int8" or "int4"
    # (weight-only, astra.models.quantize: smaller and faster decoding; the paper's Table 5)
    weights: str = "full"
    placement: str = "contiguous"
    exchange: str = "auto"  # how codes travel (astra.parallel.runtime.EXCHANGES)
    # decoding: remote K/V rebuilt once ("rebuilt", as fast as one device per step) or kept
    # as codes and rebuilt every step ("codes", the paper's App. G memory saving)
    remote_cache: str = "rebuilt"
    overlap: bool = True  # the code exchange overlaps local attention
    use_tables: bool = False  # per-code projection tables at the hidden point
    # "auto": a request whose one-device estimate beats the group's on the current link runs
    # on one device (short prompts, fast links); the record says so
    fallback: str = "off"
    threads_per_device: int = 1
    backend: str = "auto"  # gloo on CPU, nccl with CUDA
    start_timeout_s: float = 300.0  # workers up, model loaded, warmed up
    request_timeout_s: float = 600.0  # one request, from its start to its last token
    peer_timeout_s: float = 30.0  # a device silent this long is named and the group re-forms
    warmup_tokens: int = 128  # one untimed pass per method at start (allocators, tables)
    # a failed device: re-form on the others and go on (a server), or stop (a one-shot run)
    reform: bool = True

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        for name in self.methods + (self.method,):
            if name not in GENERATING_METHODS:
                raise ValueError(
                    f"method {name!r} cannot serve requests; choose from "
                    f"{', '.join(GENERATING_METHODS)} (tp, pp and bp are prefill-only "
                    "baselines in `astra bench`)"
                )
        if self.method not in self.methods:
            object.__setattr__(self, "methods", tuple(self.methods) + (self.method,))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights {self.weights!r} is not one of {tuple(WEIGHTS)}")
        PlacementConfig(self.devices, kind=self.placement)  # validates the kind
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange {self.exchange!r} is not one of {EXCHANGES}")
        if self.remote_cache not in REMOTE_CACHES:
            raise ValueError(f"remote_cache {self.remote_cache!r} is not one of {REMOTE_CACHES}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback {self.fallback!r} is not one of {FALLBACKS}")
        if self.threads_per_device < 1:
            raise ValueError(f"threads_per_device must be >= 1, got {self.threads_per_device}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend {self.backend!r} is not one of auto, gloo, nccl")
        _positive_seconds("start_timeout_s", self.start_timeout_s)
        _positive_seconds("request_timeout_s", self.request_timeout_s)
        _positive_seconds("peer_timeout_s", self.peer_timeout_s)
        if self.warmup_tokens < 1:
            raise ValueError(f"warmup_tokens must be >= 1, got {self.warmup_tokens}")
