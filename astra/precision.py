"""The precisions a device computes and searches codes in: names a user types, one place.

A leaf module (torch only), so that the per-pass code (astra.parallel.passes) and the library
API's configs (astra.group.config) can both import it without importing each other.
"""

from __future__ import annotations

import torch

# the precision every device computes in (weights and activations); codebooks stay float32.
# bfloat16 is what CPUs with AMX / AVX-512 BF16 and GPUs run fastest (about 3x fp32 here)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the senders' nearest-code search: "auto" = bf16 dot products on CPUs that have them natively,
# elsewhere a first pass in a third of the dimensions ("pca") (astra.parallel.passes.
# search_kind), or forced; both re-rank their best candidates exactly, see
# astra.vq.codebook.GroupedCodebook.encode, benchmarks/latency.md and search_alternatives.py
SEARCHES = ("auto", "float32", "bfloat16", "pca")
