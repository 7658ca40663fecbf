"""Bytes a sliding-window model saves on the wire: a device sends a block's codes only to the
devices that hold a token whose window reaches one of its tokens (astra.parallel.runtime).

Measured, not computed: each row runs ASTRA's real per-rank runtime in the composed mode
(lockstep threads, astra.net.lockstep) on a model with the layer layout of a real family and
counts the bytes every rank sends; the same model with every window removed is the reference.
Widths are cut down (the codes' size does not depend on them: G x log2 K bits per token per
block), the layer pattern, window and token counts are the families' own.

    .venv/bin/python benchmarks/sliding_window_bytes.py            # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from astra.models.decoder import Decoder, DecoderConfig
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.parallel.config import AstraConfig
from astra.parallel.engine import build_sequence_layout, rank_forward
from astra.parallel.placement import PlacementConfig
from astra.parallel.simulate import apply_astra
from astra.provenance import provenance
from astra.storage import write_json

# name -> (layers, window per layer): the families' own layouts
LAYOUTS = {
    # Gemma 3 1B: 26 layers, 5 sliding (512 tokens) then 1 global
    "gemma3-1b": [None if (i + 1) % 6 == 0 else 512 for i in range(26)],
    # Gemma 2 2B: 26 layers alternating sliding (4096) and global
    "gemma2-2b": [4096 if i % 2 == 0 else None for i in range(26)],
    # Mistral 7B v0.1: 32 layers, all sliding (4096)
    "mistral-7b-v0.1": [4096] * 32,
    # Phi-3-mini-4k: 32 layers, all sliding (2047)
    "phi3-mini-4k": [2047] * 32,
}


def measure(windows, tokens: int, devices: int, groups: int, codebook_size: int) -> dict:
    cfg = DecoderConfig(vocab_size=64, dim=32, num_layers=len(windows), num_heads=2,
                        num_kv_heads=1, head_dim=16, mlp_dim=32, layer_windows=tuple(windows))
    torch.manual_seed(0)
    model = Decoder(cfg).eval()
    astra = apply_astra(copy.deepcopy(model), AstraConfig(
        quant_point="kv", num_groups=groups, codebook_size=codebook_size))
    x = torch.randn(1, tokens, cfg.dim)
    seq = build_sequence_layout(tokens, PlacementConfig(devices), "none")

    def fn(rank, world_size, comm):
        with torch.no_grad():
            rank_forward(rank, world_size, comm, share_weights_copy(astra.model),
                         astra.quantizers, x, seq)
        return comm.stats.bytes_sent

    sent, _, _ = run_lockstep(fn, devices, LinkConfig(bandwidth_mbps=10.0, latency_ms=0.0))
    return {"bytes_sent_per_device": sent, "bytes_sent": sum(sent)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="benchmarks/results/sliding_window_bytes.json")
    args = parser.parse_args()
    rows = []
    for name, windows in LAYOUTS.items():
        for tokens in args.tokens:
            for devices in args.devices:
                t0 = time.perf_counter()
                windowed = measure(windows, tokens, devices, 1, 1024)
                full = measure([None] * len(windows), tokens, devices, 1, 1024)
                row = {
                    "layout": name, "tokens": tokens, "devices": devices,
                    "bytes_windowed": windowed["bytes_sent"], "bytes_global": full["bytes_sent"],
                    "saved": 1 - windowed["bytes_sent"] / full["bytes_sent"],
                    "per_device_windowed": windowed["bytes_sent_per_device"],
                    "per_device_global": full["bytes_sent_per_device"],
                }
                rows.append(row)
                print(f"{name:16s} T={tokens:5d} N={devices}  global {row['bytes_global']:>9,d} B"
                      f"  windowed {row['bytes_windowed']:>9,d} B  saved {row['saved']:6.1%}"
                      f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    write_json(Path(args.out), {"rows": rows, "provenance": provenance(),
                                "settings": "kv point, G=1, K=1024, contiguous placement, "
                                            "streamed exchange"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
