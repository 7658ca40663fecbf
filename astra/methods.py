"""The one table of methods: every way Astra can run one inference, and what each one is.

`astra run`, `astra bench`, `astra serve` and the library API (astra.group.Group) all read this
table; nothing else lists method names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help and tables
    wire: str  # what crosses the link, per block
    exact: bool  # output equals one device's at full precision (up to float rounding)
    generates: bool  # can continue a prompt token by token (run, serve); else prefill only
    sequence_parallel: bool  # each device holds a share of the tokens (astra.parallel.engine)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("single", "the whole model on one device", "nothing", True, True, False),
        Method(
            "astra",
            "ASTRA: sequence parallel, remote tokens as vector-quantized codes (the paper)",
            "bit-packed codebook indices",
            False,
            True,
            True,
        ),
        Method(
            "sp-fp32",
            "sequence parallelism with full-precision exchange (Voltage)",
            "fp32 attention inputs",
            True,
            True,
            True,
        ),
        Method(
            "sp-fp16",
            "sequence parallelism with half-precision exchange",
            "fp16 attention inputs",
            False,
            True,
            True,
        ),
        Method(
            "tp",
            "Megatron tensor parallelism: heads and MLP columns split, two all-reduces per block",
            "partial sums of the hidden states",
            True,
            False,
            False,
        ),
        Method(
            "pp",
            "pipeline parallelism: contiguous blocks per device, chunked prefill",
            "hidden states between stages",
            True,
            False,
            False,
        ),
        Method(
            "bp",
            "block parallelism (DeTransformer): changes the model, latency only",
            "hidden states at each synchronisation",
            False,
            False,
            False,
        ),
    )
}

GENERATING_METHODS = tuple(name for name, m in METHODS.items() if m.generates)
SEQUENCE_PARALLEL_METHODS = tuple(name for name, m in METHODS.items() if m.sequence_parallel)
PREFILL_ONLY_METHODS = tuple(name for name, m in METHODS.items() if not m.generates)


def check_methods(names: tuple[str, ...] | list[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The names, checked against `allowed`: one message naming the bad ones and the choices."""
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"methods {list(names)}: each must be one of {', '.join(allowed)}")
    return tuple(names)
