"""Vector quantization for ASTRA: grouped codebooks, wire packing, noise-augmented training."""

from astra.vq.codebook import CodebookConfig, GroupedCodebook, table_sum
from astra.vq.noise import ResidualNoise
from astra.vq.packing import MAX_BITS, pack_codes, packed_num_bytes, unpack_codes

__all__ = [
    "MAX_BITS",
    "CodebookConfig",
    "GroupedCodebook",
    "ResidualNoise",
    "pack_codes",
    "packed_num_bytes",
    "table_sum",
    "unpack_codes",
]
