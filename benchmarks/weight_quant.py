"""Weight quantization combined with ASTRA (the paper's Table 5 analogue), SmolLM2-135M.

For full-precision weights (fp32 and bf16) and 8- and 4-bit weights (astra.models.quantize:
torch's own CPU kernels, bf16 activations in the quantized layers), each row measures:
- memory of the model's weights;
- perplexity on held-out Austen (--windows x 256 tokens): one device, and ASTRA with the
  training-free G=32 codebooks on 2 and 4 simulated devices (codebooks calibrated on the
  full-precision model, used as they are on the quantized one);
- one thread per device: the single-device prefill of a --tokens prompt, its decoding time per
  token (KV cache), and ASTRA's prefill on 2 devices (the per-rank runtime in the composed
  mode: each rank's compute measured, composed with a 10 Mbit/s link, latency 0).
Writes benchmarks/results/weight_quant.json with the command and git commit.

    .venv/bin/python benchmarks/weight_quant.py \
        --artefact ~/.cache/astra/artefacts/bench/smol-kv-g32.safetensors
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from astra.hub import resolve_model
from astra.models import KVCache, load_model
from astra.models.quantize import quantize_weights_, weight_bytes
from astra.net.link import LinkConfig
from astra.net.lockstep import run_lockstep, share_weights_copy
from astra.parallel.artefact import load_astra
from astra.parallel.engine import build_sequence_layout, rank_forward
from astra.parallel.placement import PlacementConfig
from astra.parallel.train import evaluate
from astra.provenance import provenance
from astra.storage import write_json
from astra.tasks import TaskConfig, make_task


def variant(base, weights: str):
    model = copy.deepcopy(base)
    if weights == "bf16":
        return model.to(torch.bfloat16)
    if weights in ("int8", "int4"):
        return quantize_weights_(model, 8 if weights == "int8" else 4)
    return model


@torch.no_grad()
def speed(model, tokens: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator()
                        .manual_seed(0))
    prefill, tpot = [], []
    for _ in range(repeats):
        caches = [KVCache() for _ in model.blocks]
        t0 = time.perf_counter()
        logits = model(ids, caches=caches)
        prefill.append((time.perf_counter() - t0) * 1e3)
        token = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, caches=caches)[:, -1:].argmax(-1)
        tpot.append((time.perf_counter() - t0) * 1e3 / new_tokens)
    return {"prefill_ms": statistics.median(prefill), "tpot_ms": statistics.median(tpot),
            "prefill_repeats_ms": prefill, "tpot_repeats_ms": tpot}


@torch.no_grad()
def astra_prefill_ms(astra, tokens: int, devices: int, repeats: int) -> float:
    x = astra.model.embed(torch.randint(0, astra.model.config.vocab_size, (1, tokens),
                                        generator=torch.Generator().manual_seed(0)))
    seq = build_sequence_layout(tokens, PlacementConfig(devices), "none")

    def fn(rank, world_size, comm):
        rank_forward(rank, world_size, comm, share_weights_copy(astra.model), astra.quantizers,
                     x, seq)

    times = []
    for _ in range(repeats):
        _, clocks, _ = run_lockstep(fn, devices, LinkConfig(bandwidth_mbps=10.0, latency_ms=0.0))
        times.append(max(clocks) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--artefact", required=True, help="G=32 codebooks (astra calibrate)")
    parser.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/weight_quant.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model(args.model)
    base = load_model(model_dir)
    rows = []
    for weights in args.weights:
        t0 = time.perf_counter()
        model = variant(base, weights)
        row = {"weights": weights, "weight_bytes": weight_bytes(model)}
        task = make_task(model, model_dir, TaskConfig(seq_len=256))
        astra = load_astra(args.artefact, model, model_dir)
        row["ppl_one_device"] = evaluate(astra, task, None, limit=args.windows, progress=False)
        for n in (2, 4):
            row[f"ppl_astra_{n}dev"] = evaluate(astra, task, PlacementConfig(n),
                                                limit=args.windows, progress=False)
        for block in astra.model.blocks:  # the single-device timing runs the plain model
            block.attn = getattr(block.attn, "inner", block.attn)
        row.update(speed(model, args.tokens, args.new_tokens, args.repeats))
        astra = load_astra(args.artefact, model, model_dir)
        row["astra_2dev_prefill_ms"] = astra_prefill_ms(astra, args.tokens, 2, args.repeats)
        rows.append(row)
        print(f"{weights:5s} {row['weight_bytes'] / 1e6:7.1f} MB  ppl 1 dev "
              f"{row['ppl_one_device']:.2f}  ASTRA 2/4 dev {row['ppl_astra_2dev']:.2f}/"
              f"{row['ppl_astra_4dev']:.2f}  prefill {row['prefill_ms']:.0f} ms  TPOT "
              f"{row['tpot_ms']:.1f} ms  ASTRA 2-dev prefill {row['astra_2dev_prefill_ms']:.0f} ms"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    write_json(Path(args.out), {"rows": rows, "settings": vars(args), "provenance": provenance()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
