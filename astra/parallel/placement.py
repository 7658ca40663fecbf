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
    # cost of attending to one more key relative to a token's projections and MLP, for
    # kind="balanced" (astra.runner measures it); 0 = equal chunks (right for encoders)
    attention_ratio: float | None = None

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
        if self.attention_ratio is not None and self.attention_ratio < 0:
            raise ValueError(f"attention_ratio must be >= 0, got {self.attention_ratio}")


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


def causal_balanced_sizes(num_tokens: int, num_devices: int, attention_ratio: float) -> list[int]:
    """Contiguous chunk sizes with equal causal cost per device.

    A chunk of n tokens after p earlier ones costs n + a*(p*n + n^2/2) token-units (its
    projections and MLPs, plus its queries' keys: the earlier tokens and half its own), where a
    is `attention_ratio`. Each device in turn gets the n that reaches a 1/N share of the total:
    the positive root of a/2*n^2 + (1 + a*p)*n - share = 0. With streaming (the runtime's
    causal exchange) the last device is the critical path, so equal costs are what matter; an
    even split leaves it with the most attention work.
    """
    if num_tokens < num_devices:
        return split_sizes(num_tokens, num_devices)  # raises the clear error
    a = attention_ratio
    if a == 0:
        return split_sizes(num_tokens, num_devices)
    share = (num_tokens + a * num_tokens**2 / 2) / num_devices
    sizes, done = [], 0
    for d in range(num_devices - 1):
        b = 1 + a * done
        n = (-b + (b * b + 2 * a * share) ** 0.5) / a
        left_for_others = num_devices - 1 - d
        n = min(max(1, round(n)), num_tokens - done - left_for_others)
        sizes.append(n)
        done += n
    sizes.append(num_tokens - done)
    return sizes


def assign_tokens(num_tokens: int, config: PlacementConfig) -> torch.Tensor:
    """device_of_token (num_tokens,) int64 in [0, N)."""
    if config.kind == "balanced":
        if config.attention_ratio is None:
            raise ValueError(
                "balanced placement needs attention_ratio (the runtime sets it from the model "
                "with attention_cost_ratio); use contiguous for equal chunks"
            )
        sizes = causal_balanced_sizes(num_tokens, config.num_devices, config.attention_ratio)
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
