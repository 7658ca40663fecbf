"""Which device holds which token (paper §3.1 and App. D).

The paper splits content tokens evenly and does not say how; we default to contiguous chunks
(as Voltage-style sequence parallelism does), and also offer weighted (heterogeneous devices get
more tokens) and random assignments (the paper trains with random assignments so one codebook
generalises to any imbalance, App. D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEMENTS = ("contiguous", "balanced", "zigzag", "random")


@dataclass(frozen=True)
class CausalCost:
    """One device's work in a causal prefill, in units of one token through a block's linear
    layers (projections, MLP, norms). A device holding n tokens after p earlier ones costs

        n * (1 + encode [if it sends]) + diagonal * n^2 + cross * n * p + rebuild * p

    (its linear layers, the nearest-code search for the tokens it shares, causal attention to
    itself, attention to the earlier tokens, and rebuilding their keys/values from codes).
    With the streamed exchange the last device sends nothing (`last_encodes=False`); with the
    all-gather every device encodes.
    """

    cross: float = 0.0
    diagonal: float = 0.0
    encode: float = 0.0
    rebuild: float = 0.0
    last_encodes: bool = False

    def __post_init__(self) -> None:
        for name in ("cross", "diagonal", "encode", "rebuild"):
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
    gathered records, so all reach the same layout.
    """
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
    return CausalCost(
        cross=max(cross, 0.0) / unit,
        diagonal=max(diagonal, 0.0) / unit,
        encode=max(encode, 0.0) / unit,
        rebuild=max(rebuild, 0.0) / unit,
        last_encodes=last_encodes,
    )


@dataclass(frozen=True)
class PlacementConfig:
    num_devices: int  # N: devices sharing one sequence
    # "contiguous" chunks; "zigzag": 2N chunks, device d holds chunks d and 2N-1-d, which
    # balances causal attention (the device with the latest tokens no longer does 2x the work
    # of the first); "random" (any imbalance, App. D)
    kind: str = "contiguous"
    # "balanced": contiguous chunks sized so that every device does the same causal work
    # (the later chunks attend to more keys, so they get fewer tokens); needs `cost`
    weights: tuple[float, ...] | None = None  # relative device speeds; None = equal shares
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
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"device weights must be > 0, got {self.weights}")
            if self.kind in ("zigzag", "balanced"):
                raise ValueError(f"{self.kind} placement sizes chunks itself; it takes no weights")
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


def causal_balanced_sizes(num_tokens: int, num_devices: int, cost: CausalCost) -> list[int]:
    """Contiguous chunk sizes that minimise the largest per-device cost (CausalCost.of).

    With streaming (the runtime's causal exchange) each device runs at its own pace and trails
    its predecessors by one latency, so equal costs are what matter: an even split leaves the
    last device the most attention, and the others the encoding. Bisection on the cost cap C:
    each device in turn takes the most tokens that fit under C, and C is feasible when the last
    device's remainder fits too.

    The (N-1) link latencies of a streamed prefill are not balanced away on purpose: giving the
    later devices less work to make up for starting later does not help, because a device can
    never get ahead of its predecessor's codes (it finishes at least one latency after it), so
    the makespan is about (N-1) * latency + the largest work whatever the split. Tried: sizes
    with that lag charged ran 654 ms against 615 ms contiguous (SmolLM2, 4 devices, 20 ms).
    """
    if num_tokens < num_devices or cost == CausalCost(last_encodes=cost.last_encodes):
        return split_sizes(num_tokens, num_devices)  # (raises the clear error when too few)

    def most_tokens(cap: float, done: int, last: bool) -> int:
        """The largest n with cost.of(n, done, last) <= cap (at least 1)."""
        a = cost.diagonal
        b = 1 + cost.encode * (cost.last_encodes or not last) + cost.cross * done
        room = cap - cost.rebuild * done
        if room <= 0:
            return 1
        n = int((-b + (b * b + 4 * a * room) ** 0.5) / (2 * a)) if a > 0 else int(room / b)
        return max(n, 1)

    def greedy(cap: float) -> list[int] | None:
        sizes, done = [], 0
        for d in range(num_devices - 1):
            room = num_tokens - done - (num_devices - 1 - d)  # leave one token for each later
            n = min(most_tokens(cap, done, last=False), room)
            sizes.append(n)
            done += n
        rest = num_tokens - done
        return sizes + [rest] if cost.of(rest, done, last=True) <= cap else None

    lo, hi = 0.0, max(cost.of(num_tokens, 0, last=True), cost.of(num_tokens, 0, last=False))
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
        sizes = causal_balanced_sizes(num_tokens, config.num_devices, config.cost)
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
