"""Choosing the next token: greedy, temperature and nucleus (top-p) sampling, seeded.

The same `Sampler` runs on one device and on the decode device of a distributed prefill, so a
seeded request draws the same tokens whatever method computed the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens (OpenAI's names and defaults)."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: a fresh random draw per request
    stop: tuple[str, ...] = ()  # strings that end the completion (not included in it)
    ignore_eos: bool = False  # keep drawing after end-of-sequence (benchmarks; vLLM's name)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError(f"stop takes up to 4 non-empty strings, got {list(self.stop)}")


class Sampler:
    """Draws tokens for one request from (vocab,) logits; owns the request's random stream."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.generator = torch.Generator()
        seed = sampling.seed if sampling.seed is not None else torch.seed()
        self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor) -> int:
        logits = logits.reshape(-1).float()  # (V,)
        s = self.sampling
        if s.temperature == 0.0:
            return int(logits.argmax())
        # shifted so the largest is 0: a tiny temperature sends the rest to -inf, not NaN
        probs = torch.softmax((logits - logits.max()) / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep a token while the mass before it is below top_p (the first always stays)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
