"""Which device holds which token (paper §3.1 and App. D).

The paper splits content tokens evenly and does not say how; we default to contiguous chunks
(as Voltage-style sequence parallelism does), and also offer weighted (heterogeneous devices get
more tokens) and random assignments (the paper trains with random assignments so one codebook
generalises to any imbalance, App. D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

PLACEMENTS = ("contiguous", "balanced", "zigzag", "random")


@dataclass(frozen=True)
class CausalCost:
    """One device's work in a causal prefill, in units of one token through a block's linear
    layers (projections, MLP, norms). A device holding n tokens after p earlier ones costs

        n * (1 + encode [if it sends]) + diagonal * n^2 + cross * n * p + rebuild * p + fixed

    (its linear layers, the nearest-code search for the tokens it shares, causal attention to
    itself, attention to the earlier tokens, rebuilding their keys/values from codes, and what
    a device pays whatever its share: per-block dispatch, small matrices running slower).
    With the streamed exchange the last device sends nothing (`last_encodes=False`); with the
    all-gather every device encodes.
    """

    cross: float = 0.0
    diagonal: float = 0.0
    encode: float = 0.0
    rebuild: float = 0.0
    last_encodes: bool = False
    fixed: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cross", "diagonal", "encode", "rebuild", "fixed"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"CausalCost.{name} must be a number >= 0, got {value}")

    def of(self, n: int, p: int, last: bool) -> float:
        """The cost of n tokens after p earlier ones; `last`: the device with the latest."""
        sends = self.last_encodes or not last
        return (
            n * (1 + self.encode * sends)
            + self.diagonal * n * n
            + (self.cross * n + self.rebuild) * p
            + self.fixed
        )


# what fit_causal_cost reads, per device, from one measured pass (times in ms, wait excluded)
COST_FIELDS = ("tokens", "earlier", "sends", "linear", "encode", "local", "remote", "rebuild")


def fit_causal_cost(records: list[dict], last_encodes: bool = False) -> CausalCost:
    """CausalCost from one measured pass with contiguous chunks (every rank's timings).

    Each record has COST_FIELDS: the device's token count n and earlier tokens p, whether it
    encoded, and the ms it spent in its linear layers and in the runtime's stages (see
    RankAttention: `local` is RoPE + causal self-attention, charged to n^2; `remote` is the
    attention to earlier tokens plus the merge and output projection, whose per-token part is
    read off the first device, which has no earlier tokens). Every rank fits from the same
    gathered records, so all reach the same layout. When the chunks differ in size (the pass
    before a balanced placement with device speeds splits in proportion to speed), a constant
    every device pays is fitted too (`fixed`, see _constant_ms).
    """
    cost, unit = _fit_rates(records, last_encodes)
    # a per-device constant, then the rates without it, until they agree (each refit of the
    # rates moves the constant's estimate; the fixed point is exact on data the model made)
    fixed_ms = 0.0
    most = 0.8 * min(r["linear"] for r in records)  # the linear layers keep a per-token part
    for _ in range(50):
        fitted = [dict(r, linear=r["linear"] - fixed_ms) for r in records]
        cost, unit = _fit_rates(fitted, last_encodes)
        step = _constant_ms(fitted, cost, unit)
        if step is None:  # chunks too alike to tell a constant from the rates
            break
        new = min(max(fixed_ms + step, 0.0), most)
        if abs(new - fixed_ms) <= 1e-6 * unit:
            break
        fixed_ms = new
    return replace(cost, fixed=fixed_ms / unit)


def _fit_rates(records: list[dict], last_encodes: bool) -> tuple[CausalCost, float]:
    """The per-token and per-pair rates (fixed = 0) and the ms of one unit."""
    first = [r for r in records if r["earlier"] == 0]
    later = [r for r in records if r["earlier"] > 0]
    senders = [r for r in records if r["sends"]]
    tokens = sum(r["tokens"] for r in records)
    if not first or tokens <= 0:
        raise ValueError(
            f"cannot fit a cost model from {records}: need a device with no earlier tokens"
        )
    # ms per token of what `remote` spends outside attention (merge, output projection)
    out_proj = sum(r["remote"] for r in first) / sum(r["tokens"] for r in first)
    unit = (sum(r["linear"] for r in records) + out_proj * tokens) / tokens  # ms per token
    if not unit > 0:
        raise ValueError(f"cannot fit a cost model from {records}: no linear time measured")
    encode = sum(r["encode"] for r in senders) / max(sum(r["tokens"] for r in senders), 1)
    pairs = sum(r["tokens"] * r["earlier"] for r in later)
    cross = sum(r["remote"] - out_proj * r["tokens"] for r in later) / pairs if pairs else 0.0
    rebuild = sum(r["rebuild"] for r in later) / max(sum(r["earlier"] for r in later), 1)
    diagonal = sum(r["local"] for r in records) / sum(r["tokens"] ** 2 for r in records)
    cost = CausalCost(
        cross=max(cross, 0.0) / unit,
        diagonal=max(diagonal, 0.0) / unit,
        encode=max(encode, 0.0) / unit,
        rebuild=max(rebuild, 0.0) / unit,
        last_encodes=last_encodes,
    )
    return cost, unit


# the least spread of chunk sizes (largest / smallest) that identifies a per-device constant
FIXED_MIN_SPREAD = 1.25


def _constant_ms(records: list[dict], cost: CausalCost, unit: float) -> float | None:
    """What every device pays whatever its share, in ms: measured time = a * modelled time + b
    over the devices (least squares), b. Per-token rates alone are averages that absorb such a
    constant, which is right while the chunks are alike; it matters when they are not (unequal
    speeds: SmolLM2's devices pay about 50-150 ms per pass however few tokens they hold, up
    to a fifth of a 150-token chunk's time, and a half-speed device pays it twice).
    Identified only when the chunk sizes differ enough (before balanced placement with speeds
    the pass splits in proportion to speed); alike chunks give None: the rates alone."""
    modelled = [
        unit * cost.of(int(r["tokens"]), int(r["earlier"]), last=not r["sends"]) for r in records
    ]
    times = [sum(r[f] for f in ("linear", "encode", "local", "remote", "rebuild")) for r in records]
    tokens = [r["tokens"] for r in records]
    if len(records) < 2 or max(tokens) < FIXED_MIN_SPREAD * min(tokens):
        return None
    mean_m, mean_t = sum(modelled) / len(modelled), sum(times) / len(times)
    var = sum((m - mean_m) ** 2 for m in modelled)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in zip(modelled, times)) / var
    return mean_t - slope * mean_m if slope > 0 else None


def check_device_speeds(speeds, num_devices: int) -> tuple[float, ...]:
    """Relative device speeds (1 = this machine's core, 0.5 = half as fast), checked: one per
    device, each finite and > 0. The one place RunConfig, BenchConfig and PlacementConfig check
    them, so every front end gives the same one line naming the bad value."""
    speeds = tuple(speeds)
    shown = ",".join(f"{s:g}" if isinstance(s, (int, float)) else repr(s) for s in speeds)
    if len(speeds) != num_devices:
        raise ValueError(
            f"device speeds {shown} give {len(speeds)} speed(s) for {num_devices} devices: "
            "give one per device, e.g. 1,0.5 for 2 devices"
        )
    for s in speeds:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise ValueError(
                f"device speed {s!r} (in {shown}) must be a finite number > 0 "
                "(1 = this machine's core, 0.5 = half as fast)"
            )
    return tuple(float(s) for s in speeds)


@dataclass(frozen=True)
class PlacementConfig:
    num_devices: int  # N: devices sharing one sequence
    # "contiguous" chunks; "zigzag": 2N chunks, device d holds chunks d and 2N-1-d, which
    # balances causal attention (the device with the latest tokens no longer does 2x the work
    # of the first); "random" (any imbalance, App. D)
    kind: str = "contiguous"
    # "balanced": contiguous chunks sized so that every device finishes its causal work at the
    # same time (the later chunks attend to more keys, so they get fewer tokens); needs `cost`
    # relative device speeds (App. D: stronger devices get more tokens); None = equal devices.
    # contiguous/random: tokens in proportion; balanced: chunks that equalise cost_d / speed_d
    weights: tuple[float, ...] | None = None
    seed: int = 0  # for kind="random"
    # kind="balanced": what a device's work costs (astra.runner fits it from a measured pass
    # on the machine); CausalCost() = equal chunks, right for encoders
    cost: CausalCost | None = None

    def __post_init__(self) -> None:
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if self.kind not in PLACEMENTS:
            raise ValueError(f"placement kind {self.kind!r} is not one of {PLACEMENTS}")
        if self.weights is not None:
            if len(self.weights) != self.num_devices:
                raise ValueError(
                    f"got {len(self.weights)} device weights for {self.num_devices} devices"
                )
            object.__setattr__(self, "weights", check_device_speeds(self.weights, self.num_devices))
            if self.kind == "zigzag":
                raise ValueError(
                    "zigzag placement splits evenly and takes no device speeds; use contiguous "
                    "(tokens in proportion to speed) or balanced (equal cost / speed)"
                )
        if self.cost is not None and not isinstance(self.cost, CausalCost):
            raise ValueError(f"cost must be a CausalCost, got {self.cost!r}")


def split_sizes(num_tokens: int, num_devices: int, weights=None) -> list[int]:
    """Tokens per device: proportional to `weights`, every device at least one token."""
    if num_tokens < num_devices:
        raise ValueError(
            f"cannot split {num_tokens} tokens over {num_devices} devices: "
            f"each device needs at least one token (use <= {num_tokens} devices)"
        )
    w = torch.ones(num_devices) if weights is None else torch.tensor(weights, dtype=torch.float64)
    ideal = w / w.sum() * num_tokens
    sizes = ideal.floor().long().clamp(min=1)
    # hand the remainder to the devices whose share was rounded down the most
    remainder = num_tokens - int(sizes.sum())
    order = torch.argsort(ideal - sizes, descending=True)
    i = 0
    while remainder != 0:
        d = order[i % num_devices]
        if remainder > 0:
            sizes[d] += 1
            remainder -= 1
        elif sizes[d] > 1:
            sizes[d] -= 1
            remainder += 1
        i += 1
    return sizes.tolist()


def causal_balanced_sizes(
    num_tokens: int,
    num_devices: int,
    cost: CausalCost,
    speeds: tuple[float, ...] | None = None,
) -> list[int]:
    """Contiguous chunk sizes that minimise the largest per-device time, cost_d / speed_d
    (CausalCost.of; `speeds` relative, None = equal devices: App. D's heterogeneous devices).

    With streaming (the runtime's causal exchange) each device runs at its own pace and trails
    its predecessors by one latency, so equal times are what matter: an even split leaves the
    last device the most attention, and the others the encoding; a device half as fast should
    get half the work. Bisection on the time cap C: each device d in turn takes the most tokens
    whose cost fits under C * speed_d, and C is feasible when the last device's remainder fits
    too. At the optimum every cost_d / speed_d is about the same C, so C = sum(cost_d) /
    sum(speed_d): the split's own work spread over the group's total speed.

    The (N-1) link latencies of a streamed prefill are not balanced away on purpose: giving the
    later devices less work to make up for starting later does not help, because a device can
    never get ahead of its predecessor's codes (it finishes at least one latency after it), so
    the makespan is about (N-1) * latency + the largest time whatever the split. Tried: sizes
    with that lag charged ran 654 ms against 615 ms contiguous (SmolLM2, 4 devices, 20 ms).
    """
    if speeds is not None:
        speeds = check_device_speeds(speeds, num_devices)
    if num_tokens < num_devices or cost == CausalCost(last_encodes=cost.last_encodes):
        # no attention cost: tokens in proportion to speed (raises the clear error when too few)
        return split_sizes(num_tokens, num_devices, speeds)
    speed = speeds or (1.0,) * num_devices

    def most_tokens(cap: float, done: int, last: bool) -> int:
        """The largest n with cost.of(n, done, last) <= cap (at least 1)."""
        a = cost.diagonal
        b = 1 + cost.encode * (cost.last_encodes or not last) + cost.cross * done
        room = cap - cost.rebuild * done - cost.fixed
        if room <= 0:
            return 1
        n = int((-b + (b * b + 4 * a * room) ** 0.5) / (2 * a)) if a > 0 else int(room / b)
        return max(n, 1)

    def greedy(cap: float) -> list[int] | None:
        sizes, done = [], 0
        for d in range(num_devices - 1):
            room = num_tokens - done - (num_devices - 1 - d)  # leave one token for each later
            n = min(most_tokens(cap * speed[d], done, last=False), room)
            sizes.append(n)
            done += n
        rest = num_tokens - done
        fits = cost.of(rest, done, last=True) <= cap * speed[-1]
        return sizes + [rest] if fits else None

    # no chunk can cost more than all tokens after all tokens: hi is always feasible
    worst = max(cost.of(num_tokens, num_tokens, last) for last in (False, True))
    lo, hi = 0.0, worst / min(speed)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if greedy(mid) is not None else (mid, hi)
    return greedy(hi)


def assign_tokens(num_tokens: int, config: PlacementConfig) -> torch.Tensor:
    """device_of_token (num_tokens,) int64 in [0, N)."""
    if config.kind == "balanced":
        if config.cost is None:
            raise ValueError(
                "balanced placement needs a CausalCost (astra.runner fits one from a measured "
                "pass); use contiguous for equal chunks"
            )
        sizes = causal_balanced_sizes(num_tokens, config.num_devices, config.cost, config.weights)
        return torch.repeat_interleave(torch.arange(config.num_devices), torch.tensor(sizes))
    if config.kind == "zigzag" and num_tokens >= 2 * config.num_devices:
        n = config.num_devices
        chunks = torch.tensor(split_sizes(num_tokens, 2 * n))
        owner = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])  # chunk -> device
        return torch.repeat_interleave(owner, chunks)
    sizes = split_sizes(num_tokens, config.num_devices, config.weights)
    device_of_token = torch.repeat_interleave(torch.arange(config.num_devices), torch.tensor(sizes))
    if config.kind == "random":
        g = torch.Generator().manual_seed(config.seed)
        device_of_token = device_of_token[torch.randperm(num_tokens, generator=g)]
    return device_of_token


def full_precision_attention_rate(device_of_token: torch.Tensor, num_devices: int) -> float:
    """FPAR = sum_k n_k^2 / T^2: the share of query-key pairs that stay exact (App. D)."""
    counts = torch.bincount(device_of_token, minlength=num_devices).double()
    return float((counts**2).sum() / counts.sum() ** 2)
