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
class PlacementConfig:
    num_devices: int  # N: devices sharing one sequence
    # "contiguous" chunks; "zigzag": 2N chunks, device d holds chunks d and 2N-1-d, which
    # balances causal attention (the device with the latest tokens no longer does 2x the work
    # of the first); "random" (any imbalance, App. D)
    kind: str = "contiguous"
    # "balanced": contiguous chunks sized so that every device does the same causal work
    # (the later chunks attend to more keys, so they get fewer tokens); needs attention_ratio
    weights: tuple[float, ...] | None = None  # relative device speeds; None = equal shares
    seed: int = 0  # for kind="random"
    # kind="balanced": (cross, diagonal) cost of attention in units of one token through a
    # block's linear layers: a query attending to one key of an earlier chunk, and a chunk of n
    # tokens attending to itself causally costing diagonal*n^2 (astra.runner measures both on
    # the machine); (0, 0) = equal chunks, right for encoders
    attention_cost: tuple[float, float] | None = None

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
        if self.attention_cost is not None and (
            len(self.attention_cost) != 2 or min(self.attention_cost) < 0
        ):
            raise ValueError(f"attention_cost must be two numbers >= 0, got {self.attention_cost}")


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
    num_tokens: int, num_devices: int, cross: float, diagonal: float
) -> list[int]:
    """Contiguous chunk sizes that minimise the largest per-device causal cost.

    A chunk of n tokens after p earlier ones costs n + diagonal*n^2 + cross*p*n token-units:
    its linear layers, its causal attention to itself, its attention to the earlier chunks.
    With streaming (the runtime's causal exchange) each device's finish time is set by its own
    cost, so equal costs are what matter; an even split leaves the last device the most
    attention. Bisection on the cost cap C: each device in turn takes the most tokens that fit
    under C, and C is feasible when the last device's remainder fits too.
    """
    if num_tokens < num_devices or (cross == 0 and diagonal == 0):
        return split_sizes(num_tokens, num_devices)  # (raises the clear error when too few)

    def cost(n: int, p: int) -> float:
        return n + diagonal * n * n + cross * p * n

    def greedy(cap: float) -> list[int] | None:
        sizes, done = [], 0
        for d in range(num_devices - 1):
            room = num_tokens - done - (num_devices - 1 - d)  # leave one token for each later
            b = 1 + cross * done
            if diagonal > 0:  # largest n with diagonal*n^2 + b*n <= cap
                n = int((-b + (b * b + 4 * diagonal * cap) ** 0.5) / (2 * diagonal))
            else:
                n = int(cap / b)
            n = min(max(n, 1), room)
            sizes.append(n)
            done += n
        rest = num_tokens - done
        return sizes + [rest] if cost(rest, done) <= cap else None

    lo, hi = 0.0, cost(num_tokens, 0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if greedy(mid) is not None else (mid, hi)
    return greedy(hi)


def assign_tokens(num_tokens: int, config: PlacementConfig) -> torch.Tensor:
    """device_of_token (num_tokens,) int64 in [0, N)."""
    if config.kind == "balanced":
        if config.attention_cost is None:
            raise ValueError(
                "balanced placement needs attention_cost (astra.runner measures it on the "
                "model); use contiguous for equal chunks"
            )
        sizes = causal_balanced_sizes(num_tokens, config.num_devices, *config.attention_cost)
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
