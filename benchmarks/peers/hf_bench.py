"""transformers + torch at one thread: SmolLM2-135M prefill/decode and DINOv2-S at 1025 tokens.

    .venv/bin/python benchmarks/peers/hf_bench.py --prepared P.json --out OUT.json

Runs in the project venv (torch.set_num_threads(1)), on Astra's converted HF directories and
the inputs prepare.py wrote (the same prompt ids and pixels Astra runs), in float32 and
bfloat16, with transformers' default attention (SDPA).
- SmolLM2: prefill = one forward pass over the 1024 prompt ids with a KV cache and
  logits_to_keep=1, then the argmax (time to the first token); then NEW_TOKENS - 1 greedy steps
  through the cache (time per output token = their time / (NEW_TOKENS - 1)).
- DINOv2-S: one Dinov2Model forward pass on the 448 px image (1025 tokens).
One warm-up pass per model, then REPEATS rounds, each running every model once (interleaved).
Each pass is timed as wall time and as the thread's CPU time (time.thread_time, as Astra's
composed mode times its devices).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from timing import decode_record  # benchmarks/peers/timing.py, beside this script
from transformers import Dinov2Model, LlamaForCausalLM

from astra.storage import write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.inference_mode()
def decoder_pass(model, ids: torch.Tensor, new_tokens: int) -> dict:
    t0, c0 = time.perf_counter(), time.thread_time()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[0, -1].argmax()
    t1, c1 = time.perf_counter(), time.thread_time()
    generated = [int(token)]
    past = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[0, -1].argmax()
        generated.append(int(token))
    t2, c2 = time.perf_counter(), time.thread_time()
    return decode_record((t0, c0), (t1, c1), (t2, c2), new_tokens, generated)


@torch.inference_mode()
def encoder_pass(model, pixels: torch.Tensor) -> dict:
    t0, c0 = time.perf_counter(), time.thread_time()
    hidden = model(pixel_values=pixels).last_hidden_state
    return {
        "forward_ms": (time.perf_counter() - t0) * 1e3,
        "forward_cpu_ms": (time.thread_time() - c0) * 1e3,
        "tokens": hidden.shape[1],
    }


def stats(values: list[float], digits: int) -> dict:
    values = [round(v, digits) for v in values]
    return {
        "repeats": values,
        "median": round(statistics.median(values), digits),
        "min": min(values),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    prepared = json.loads(args.prepared.read_text())
    ids = torch.tensor([json.loads(Path(prepared["prompt"]["path"]).read_text())["input_ids"]])
    pixels = torch.from_numpy(np.load(prepared["image"]["path"]))
    new_tokens = prepared["new_tokens"]

    decoders = {
        name: LlamaForCausalLM.from_pretrained(prepared["smollm2_dir"], dtype=dt).eval()
        for name, dt in DTYPES.items()
    }
    encoders = {
        name: Dinov2Model.from_pretrained(prepared["dinov2_dir"], dtype=dt).eval()
        for name, dt in DTYPES.items()
    }
    for model in decoders.values():
        decoder_pass(model, ids, new_tokens)  # warm-up
    for name, model in encoders.items():
        encoder_pass(model, pixels.to(DTYPES[name]))
    dec: dict[str, list[dict]] = {name: [] for name in decoders}
    enc: dict[str, list[dict]] = {name: [] for name in encoders}
    for r in range(args.repeats):
        for name, model in decoders.items():
            dec[name].append(decoder_pass(model, ids, new_tokens))
            p = dec[name][-1]
            print(
                f"transformers smollm2 {name} #{r + 1}: prefill {p['prefill_ms']:.0f} ms, "
                f"tpot {p['tpot_ms']:.1f} ms",
                flush=True,
            )
        for name, model in encoders.items():
            enc[name].append(encoder_pass(model, pixels.to(DTYPES[name])))
            print(
                f"transformers dinov2 {name} #{r + 1}: {enc[name][-1]['forward_ms']:.0f} ms",
                flush=True,
            )
    attn = {name: m.config._attn_implementation for name, m in decoders.items()}
    out = {
        "engine": "transformers",
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "threads": {
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
        },
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "attn_implementation": attn,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "smollm2": {},
        "dinov2": {},
    }
    for name, passes in dec.items():
        pre = stats([p["prefill_ms"] for p in passes], 1)
        tpot = stats([p["tpot_ms"] for p in passes], 2)
        out["smollm2"][name] = {
            "prefill_ms_repeats": pre["repeats"],
            "prefill_ms_median": pre["median"],
            "prefill_ms_min": pre["min"],
            "tpot_ms_repeats": tpot["repeats"],
            "tpot_ms_median": tpot["median"],
            "tpot_ms_min": tpot["min"],
            "generated_ids": passes[-1]["generated_ids"],
        }
        for key, digits in (("prefill_cpu_ms", 1), ("tpot_cpu_ms", 2)):
            cpu = stats([p[key] for p in passes], digits)
            out["smollm2"][name][f"{key}_repeats"] = cpu["repeats"]
            out["smollm2"][name][f"{key}_median"] = cpu["median"]
    for name, passes in enc.items():
        fw = stats([p["forward_ms"] for p in passes], 1)
        out["dinov2"][name] = {
            "tokens": int(passes[-1]["tokens"]),
            "forward_ms_repeats": fw["repeats"],
            "forward_ms_median": fw["median"],
            "forward_ms_min": fw["min"],
        }
        cpu = stats([p["forward_cpu_ms"] for p in passes], 1)
        out["dinov2"][name]["forward_cpu_ms_repeats"] = cpu["repeats"]
        out["dinov2"][name]["forward_cpu_ms_median"] = cpu["median"]
    write_json(args.out, out)


if __name__ == "__main__":
    main()
