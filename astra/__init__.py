"""Astra: ASTRA (arXiv 2505.19342) multi-device Transformer inference over weak links."""

__version__ = "0.1.0"
