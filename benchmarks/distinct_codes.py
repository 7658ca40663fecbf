"""How many distinct codes a device's remote tokens carry, per block: what the encoders'
distinct-code attention (astra.parallel.runtime.attend_counted_keys) attends to instead of
every remote token, for the calibrated codebooks `astra run` loads and for the timing-only
codebooks `astra bench` used to time with (drawn from the very tokens timed).

Runs the real per-rank runtime (lockstep ranks in one process, an ideal link) on the built-in
input and reads every block's counters on every rank.

    .venv/bin/python benchmarks/distinct_codes.py                   # DINOv2-S, 2 and 4 devices
    .venv/bin/python benchmarks/distinct_codes.py --model minilm-l6 --tokens 512
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from astra.bench import timing_artefact
from astra.hub import resolve_model
from astra.models import load_model, model_kind, model_spec
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.parallel.artefact import load_astra
from astra.parallel.config import AstraConfig
from astra.parallel.engine import build_sequence_layout, expand_class_tokens, rank_forward
from astra.parallel.passes import embed_inputs
from astra.parallel.placement import PlacementConfig
from astra.provenance import provenance
from astra.runner import RunConfig, build_inputs, default_artefact
from astra.storage import write_json


def per_block_counts(model_dir: Path, artefact: Path, inputs: dict, devices: int) -> list[dict]:
    """Per rank: each block's (distinct remote codes, remote tokens)."""
    astra = load_astra(artefact, load_model(model_dir), model_dir)
    x = embed_inputs(astra.model, inputs)
    seq = build_sequence_layout(x.shape[1], PlacementConfig(devices), astra.class_tokens)
    x_full = expand_class_tokens(x, seq.num_replicas)

    def rank(r, world_size, comm):
        local = share_weights_copy(astra.model)
        with torch.no_grad():
            rank_forward(r, world_size, comm, local, astra.quantizers, x_full, seq)
        return [
            {"distinct": b.attn.distinct_codes, "remote_tokens": b.attn.remote_tokens}
            for b in local.blocks
        ]

    outs, _, _ = run_lockstep(rank, devices, LinkConfig())
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dinov2-s")
    ap.add_argument("--tokens", type=int, default=1025)
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distinct_codes.json"))
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    if model_kind(model_dir) == "decoder":
        raise SystemExit(f"{args.model} is a decoder: its RoPE keys are attended per token")
    config = AstraConfig(
        quant_point=model_spec(model_dir).quant_point,
        num_groups=1,
        codebook_size=1024,
        class_tokens=model_spec(model_dir).class_tokens,
    )
    calibrated = default_artefact(model_dir, config)
    if not calibrated.is_file():
        raise SystemExit(f"no calibrated codebooks cached at {calibrated}: run `astra run "
                         f"--model {args.model} --devices 2` once to calibrate them")
    inputs, _, label = build_inputs(RunConfig(model=args.model, tokens=args.tokens), model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timing = timing_artefact(model_dir, config, inputs, Path(tmp) / "timing.safetensors")
        for name, artefact in (("calibrated", calibrated), ("timing-only", timing)):
            for n in args.devices:
                ranks = per_block_counts(model_dir, artefact, inputs, n)
                distinct = [c["distinct"] for blocks in ranks for c in blocks]
                remote = sum(c["remote_tokens"] for blocks in ranks for c in blocks)
                share = sum(distinct) / remote
                rows.append({"codebooks": name, "devices": n, "per_rank_per_block": ranks,
                             "distinct_min": min(distinct), "distinct_max": max(distinct),
                             "share": round(share, 4)})
                print(f"{name:12s} {n} devices: {min(distinct)}-{max(distinct)} distinct codes "
                      f"per block and rank, {share:.1%} of the remote tokens", flush=True)
    write_json(args.out, {"model": args.model, "input": label, "calibrated": calibrated.name,
                          "rows": rows, "provenance": provenance()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
