"""What the senders' bf16 nearest-code search (`--search bfloat16`) costs in accuracy.

SmolLM2-135M with the training-free G=1, K=1024 kv-point codebooks that `astra run` uses, 4
simulated devices (the accuracy tables' setting), held-out Austen: perplexity with the exact
float32 search against the bf16 one, plus how many codes change and by how much the
quantization error grows. The bf16 run swaps in exactly the search the runtime's senders call
with `--search bfloat16` (GroupedCodebook.encode(x, "bfloat16")). Last, the whole model in
bf16 (`--dtype bfloat16`, whose search is the bf16 one): full precision and ASTRA.

    .venv/bin/python benchmarks/search_precision.py [--limit 16] [--seq-len 256]

Writes benchmarks/results/search_precision.json (with this command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from astra.hub import resolve_model
from astra.models import load_model
from astra.parallel.artefact import load_astra
from astra.parallel.passes import to_compute_dtype_
from astra.parallel.placement import PlacementConfig
from astra.parallel.train import evaluate
from astra.runner import RunConfig, ensure_artefact
from astra.tasks import TaskConfig, make_task
from astra.vq import GroupedCodebook


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=16, help="held-out sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/search_precision.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model_dir = resolve_model("smollm2-135m")
    artefact = ensure_artefact(RunConfig(), model_dir)  # the main job's codebooks
    astra = load_astra(artefact, load_model(model_dir), model_dir)
    task = make_task(astra.model, model_dir, TaskConfig(seq_len=args.seq_len))
    exact_encode = GroupedCodebook.encode
    stats = {"codes": 0, "changed": 0, "sq_err_exact": 0.0, "sq_err_bf16": 0.0}

    def bf16_encode(self, x, search=None):
        codes = exact_encode(self, x, "bfloat16")
        with torch.no_grad():  # bookkeeping: what the exact search would have sent
            exact = exact_encode(self, x, "float32")
            flat = x.detach().float().reshape(-1, self.config.dim)
            stats["codes"] += codes.numel()
            stats["changed"] += int((codes != exact).sum())
            for name, c in (("sq_err_exact", exact), ("sq_err_bf16", codes)):
                stats[name] += float((flat - self.decode(c.reshape(-1, c.shape[-1]))).pow(2).sum())
        return codes

    rows = {}
    placement = PlacementConfig(args.devices)
    for search in ("float32", "bfloat16"):
        GroupedCodebook.encode = exact_encode if search == "float32" else bf16_encode
        t0 = time.perf_counter()
        with torch.no_grad():
            ppl = evaluate(astra, task, placement, limit=args.limit, progress=False)
        rows[search] = {"perplexity": ppl, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"search {search:>8}: perplexity {ppl:.3f}")
    GroupedCodebook.encode = exact_encode
    with torch.no_grad():
        fp = evaluate(astra, task, None, limit=args.limit, progress=False)
        # the whole model in bf16 (`--dtype bfloat16`): its search is the bf16 one by default
        to_compute_dtype_(astra.model, torch.bfloat16)
        bf16_fp = evaluate(astra, task, None, limit=args.limit, progress=False)
        bf16_astra = evaluate(astra, task, placement, limit=args.limit, progress=False)
    print(f"bf16 compute: full precision {bf16_fp:.3f}, ASTRA {bf16_astra:.3f}")
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": "smollm2-135m",
        "artefact": str(artefact),
        "devices": args.devices,
        "limit": args.limit,
        "seq_len": args.seq_len,
        "full_precision_perplexity": fp,
        "rows": rows,
        "bf16_compute": {"full_precision_perplexity": bf16_fp, "astra_perplexity": bf16_astra},
        "codes_changed_fraction": stats["changed"] / max(stats["codes"], 1),
        "quantization_error_ratio": stats["sq_err_bf16"] / max(stats["sq_err_exact"], 1e-30),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
