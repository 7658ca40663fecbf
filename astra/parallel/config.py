"""AstraConfig: what ASTRA quantizes and how (paper §3.2-§3.4)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

QUANT_POINTS = ("hidden", "kv")
CLASS_TOKEN_MODES = ("distributed", "single", "none")


@dataclass(frozen=True)
class AstraConfig:
    # "hidden": one codebook on each block's attention input, i.e. after the pre-norm (paper's
    #   choice for ViT and GPT-2). The remote device rebuilds x_hat and projects it with its own
    #   W_k, W_v. Quantizing after the norm means the codebook sees unit-scale vectors whatever
    #   the residual stream's growth, and the receiver needs nothing but the attention input.
    # "kv": two codebooks per block, on keys (before RoPE) and values, each of width
    #   num_kv_heads*head_dim (paper's choice for Llama, App. G). Keys are quantized before RoPE
    #   so one codebook serves every position; the receiver rotates rebuilt keys to the sender's
    #   positions. Remote tokens then cost a lookup, not a projection.
    quant_point: str = "hidden"
    num_groups: int = 32  # G: sub-vectors per token, each with its own K-entry codebook
    codebook_size: int = 1024  # K: codes per group; log2(K) bits per group on the wire
    # "distributed": one class token replica per device, never sent, mean-pooled before the head
    #   (paper §3.4); "single": one class token on device 0, quantized and sent like any token
    #   (the ablation of Table 13); "none": no class token (decoders, mean-pooled encoders).
    class_tokens: str = "distributed"
    noise_lambda: float = 1.0  # NAQ scale λ (paper §3.3; 1.0 in the main results); train only
    commitment_weight: float = 2e-4  # β in Eq. 2; tiny because every block has a codebook
    ema_decay: float = 0.99  # codebook EMA decay; the paper does not give one

    def __post_init__(self) -> None:
        if self.quant_point not in QUANT_POINTS:
            raise ValueError(f"quant_point {self.quant_point!r} is not one of {QUANT_POINTS}")
        if self.class_tokens not in CLASS_TOKEN_MODES:
            raise ValueError(
                f"class_tokens {self.class_tokens!r} is not one of {CLASS_TOKEN_MODES}"
            )
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not 0.0 <= self.noise_lambda <= 1.0:
            raise ValueError(f"noise_lambda must be in [0, 1], got {self.noise_lambda}")
        if self.commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {self.commitment_weight}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def bits_per_code(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def codebooks_per_block(self) -> int:
        return 2 if self.quant_point == "kv" else 1

    def bits_per_token_per_block(self) -> int:
        return self.codebooks_per_block * self.num_groups * self.bits_per_code

    def to_dict(self) -> dict:
        return asdict(self)


def check_codebook_memory(widths: list[int], config: AstraConfig) -> None:
    """Before allocating: the codebooks of every block fit in the memory this machine has free.

    `widths` are the quantized widths of every block (one entry per codebook). G groups of
    width D/G with K codes each hold K*D floats whatever G is; the EMA keeps a second copy.
    Raises ValueError naming the numbers instead of letting the allocator fail (or swap).
    """
    per_copy = sum(widths) * config.codebook_size * 4  # float32
    needed = 2 * per_copy  # codebook + its EMA sum (vq.codebook.GroupedCodebook)
    free = available_memory_bytes()
    if free is None or needed <= 0.8 * free:
        return
    fits = max(2, 2 ** int(math.log2(max(2, 0.8 * free / (2 * 4 * sum(widths))))))
    raise ValueError(
        f"--codebook-size {config.codebook_size} needs {needed / 1e9:.1f} GB of codebooks "
        f"({sum(widths)} quantized values over the blocks x {config.codebook_size} codes x "
        f"4 bytes x 2 for the EMA copy), but {free / 1e9:.1f} GB of memory is available; "
        f"use --codebook-size {min(fits, config.codebook_size // 2)} or less"
    )


def available_memory_bytes() -> int | None:
    """MemAvailable on Linux; physical memory elsewhere; None if the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
