"""`astra calibrate` of SmolLM2-135M at the kv point, G=32, K=1024: the old calibration path and
the new one side by side on the same data and seed, with the stage breakdown (activations,
seeding, Lloyd, NAQ), the relative quantization error and the perplexity of each artefact.

    .venv/bin/python benchmarks/calibration_speed.py [--sequences 32] [--max-samples 8192]
        [--kmeans-iters 10] [--limit 16] [--devices 4] [--skip-old]

old: astra.parallel.train.calibrate_ as of commit 2079acb, rebuilt from the functions kept for
it: one-at-a-time k-means++ for all 60 codebooks at once (seed_codebooks), plain Lloyd (every
assignment a full (G, N, K) search: lloyd_dense), encode() for the residual, torch's default
thread count. new: calibrate_ itself (k-means++ in 32 rounds, pruned Lloyd, one intra-op thread
and one worker thread per core). The load average is recorded before and after: these machines
are shared. Writes benchmarks/results/calibration_speed.json and both artefacts under
$ASTRA_HOME/artefacts/bench/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from astra.hub import resolve_model
from astra.models import load_model
from astra.parallel.artefact import save_artefact
from astra.parallel.config import AstraConfig
from astra.parallel.placement import PlacementConfig
from astra.parallel.simulate import apply_astra
from astra.parallel.train import calibrate_, evaluate, subsample
from astra.provenance import provenance
from astra.storage import write_json
from astra.tasks import TaskConfig, make_task
from astra.vq.codebook import lloyd_dense, seed_codebooks


@torch.no_grad()
def old_calibrate_(astra, task, *, num_sequences, max_samples, kmeans_iters, seed) -> dict:
    """calibrate_ before this change, stage by stage (same activations, subsampling and seed)."""
    astra.eval()
    t0 = time.perf_counter()
    batches = list(task.batches("train", num_sequences))
    recorded = astra.record_quant_inputs(
        lambda: [
            astra.forward_hidden(task.embed(astra.model, b), None, task.attention_mask(b))
            for b in batches
        ]
    )
    recorded = subsample(recorded, max_samples, seed)
    t1 = time.perf_counter()
    codebooks = [c for q in astra.quantizers for c in q.codebooks]
    seeds = iter(seed_codebooks(codebooks, [s for parts in recorded for s in parts], seed))
    t2 = time.perf_counter()
    lloyd_s = naq_s = 0.0
    errors = []
    bar = tqdm(total=len(codebooks), desc="old k-means")
    for quantizer, parts in zip(astra.quantizers, recorded):
        block_errors = []
        for codebook, noise, samples in zip(quantizer.codebooks, quantizer.noises, parts):
            t = time.perf_counter()
            # kmeans_init_(seeds=...) as it was: Lloyd with a full search per assignment
            x = codebook._to_groups(samples).contiguous()
            centers, codes, _ = lloyd_dense(x, next(seeds), kmeans_iters)
            codebook.set_centers_(centers, codes)
            lloyd_s += time.perf_counter() - t
            t = time.perf_counter()
            residual = samples - codebook.decode(codebook.encode(samples))
            noise.reset_()
            noise.fit_(residual)
            naq_s += time.perf_counter() - t
            block_errors.append(float(residual.square().sum() / samples.square().sum()))
            bar.update()
        errors.append(block_errors)
    bar.close()
    seconds = {"activations": t1 - t0, "kmeans": time.perf_counter() - t1, "seeding": t2 - t1,
               "lloyd": lloyd_s, "naq": naq_s}  # fmt: skip
    return {"relative_error_per_block": errors, "seconds": seconds}


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=32, help="calibration sequences (32)")
    p.add_argument("--max-samples", type=int, default=8192, help="vectors per codebook (8192)")
    p.add_argument("--kmeans-iters", type=int, default=10, help="Lloyd iterations (10)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--limit", type=int, default=16, help="held-out sequences for perplexity")
    p.add_argument("--devices", type=int, default=4, help="simulated devices for perplexity")
    p.add_argument("--skip-old", action="store_true", help="time the new path only")
    p.add_argument("--out", default="benchmarks/results/calibration_speed.json")
    args = p.parse_args()
    model_dir = resolve_model("smollm2-135m")
    config = AstraConfig(quant_point="kv", num_groups=32, codebook_size=1024)
    settings = {"num_sequences": args.sequences, "max_samples": args.max_samples,
                "kmeans_iters": args.kmeans_iters, "seed": 0}  # fmt: skip
    artefacts = Path(os.environ.get("ASTRA_HOME", Path.home() / ".cache/astra")) / "artefacts"
    result = {**provenance(sys.argv), "settings": {**vars(args), **settings}, "paths": {}}
    result["command"] = "python " + " ".join(sys.argv)
    result["load_average_before"] = load_average()
    fp = None
    for name in ("new", "old"):
        if name == "old" and args.skip_old:
            continue
        model = load_model(model_dir)
        task = make_task(model, model_dir, TaskConfig(seq_len=args.seq_len))
        astra = apply_astra(model, config)
        load = load_average()
        t = time.perf_counter()
        if name == "new":
            report = calibrate_(astra, task, **settings)
        else:
            report = old_calibrate_(astra, task, **settings)
        total = time.perf_counter() - t
        flat = [e for block in report["relative_error_per_block"] for e in block]
        path = artefacts / "bench" / f"smol-kv-g32-calibration-{name}.safetensors"
        save_artefact(path, astra, model_dir, extra={"mode": "calibrated", "calibration": {
            **settings, **report}})  # fmt: skip
        ppl = evaluate(astra, task, PlacementConfig(args.devices), limit=args.limit,
                       progress=False)  # fmt: skip
        if fp is None:
            fp = evaluate(astra, task, None, limit=args.limit, progress=False)
        result["paths"][name] = {
            "total_s": total,
            "seconds": report["seconds"],
            "load_average_at_start": load,
            "mean_relative_error": sum(flat) / len(flat),
            "relative_error_per_block": report["relative_error_per_block"],
            "perplexity": ppl,
            "artefact": str(path),
        }
        print(f"{name}: {total:.1f} s {report['seconds']}, mean relative error "
              f"{sum(flat) / len(flat):.5f}, perplexity {ppl:.3f}", flush=True)  # fmt: skip
    result["full_precision_perplexity"] = fp
    result["load_average_after"] = load_average()
    if "old" in result["paths"]:
        old, new = result["paths"]["old"], result["paths"]["new"]
        result["speedup"] = old["total_s"] / new["total_s"]
        result["relative_error_ratio"] = new["mean_relative_error"] / old["mean_relative_error"]
        result["perplexity_change"] = new["perplexity"] / old["perplexity"] - 1
    write_json(Path(args.out), result)
    print(f"full precision perplexity {fp:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
