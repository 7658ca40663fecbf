"""llama.cpp (through llama-cpp-python) on SmolLM2-135M at one thread: prefill and decode.

    .venv-peers/bin/python benchmarks/peers/llamacpp_bench.py --prepared P.json --out OUT.json

Runs in the peers venv (no torch). For each GGUF in P.json (Q4_1 as shipped, F32, BF16) and
flash attention off and on, one model instance at n_threads = n_threads_batch = 1. A pass:
clear the KV cache, evaluate the prompt's token ids (the same ids Astra prefills) in one batch,
read the last position's logits and take the argmax (prefill = time to the first token), then
feed each chosen token back NEW_TOKENS - 1 times (time per output token = that loop's time /
(NEW_TOKENS - 1)). Greedy, so the generated ids can be compared across engines. Each is timed
as wall time and as the thread's CPU time (time.thread_time, as Astra's composed mode times its
devices; at one thread all the work runs in the calling thread). Passes are interleaved: one
warm-up pass per instance, then every instance once per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from timing import decode_record  # benchmarks/peers/timing.py, beside this script


def one_pass(llm, ids: list[int], new_tokens: int) -> dict:
    import llama_cpp

    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    llm.reset()
    llm._ctx.kv_cache_clear()
    t0, c0 = time.perf_counter(), time.thread_time()
    llm.eval(ids)
    token = argmax_last()
    t1, c1 = time.perf_counter(), time.thread_time()
    generated = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = argmax_last()
        generated.append(token)
    t2, c2 = time.perf_counter(), time.thread_time()
    return decode_record((t0, c0), (t1, c1), (t2, c2), new_tokens, generated)


def summary(passes: list[dict]) -> dict:
    pre = [round(p["prefill_ms"], 1) for p in passes]
    tpot = [round(p["tpot_ms"], 2) for p in passes]
    pre_cpu = [round(p["prefill_cpu_ms"], 1) for p in passes]
    tpot_cpu = [round(p["tpot_cpu_ms"], 2) for p in passes]
    return {
        "prefill_cpu_ms_repeats": pre_cpu,
        "prefill_cpu_ms_median": round(statistics.median(pre_cpu), 1),
        "tpot_cpu_ms_repeats": tpot_cpu,
        "tpot_cpu_ms_median": round(statistics.median(tpot_cpu), 2),
        "prefill_ms_repeats": pre,
        "prefill_ms_median": round(statistics.median(pre), 1),
        "prefill_ms_min": min(pre),
        "tpot_ms_repeats": tpot,
        "tpot_ms_median": round(statistics.median(tpot), 2),
        "tpot_ms_min": min(tpot),
        "generated_ids": passes[-1]["generated_ids"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--only", help="one instance, e.g. f32-faon (the head-to-head's; default: every one)"
    )
    ap.add_argument("--new-tokens", type=int, help="default: the prepared file's (32)")
    args = ap.parse_args()

    import llama_cpp

    prepared = json.loads(args.prepared.read_text())
    ids = json.loads(Path(prepared["prompt"]["path"]).read_text())["input_ids"]
    new_tokens = prepared["new_tokens"] if args.new_tokens is None else args.new_tokens
    if new_tokens < 1:
        ap.error(f"--new-tokens {new_tokens}: expected at least 1")
    system_info = llama_cpp.llama_print_system_info().decode()
    print(f"llama.cpp system info: {system_info}", file=sys.stderr)

    instances = {}
    errors = {}
    for quant, entry in prepared["gguf"].items():
        if "error" in entry or not Path(entry["path"]).exists():
            errors[quant] = entry.get("error", "file missing")
            continue
        for fa in (False, True):
            name = f"{quant}-fa{'on' if fa else 'off'}"
            if args.only and name != args.only:
                continue
            try:
                llm = llama_cpp.Llama(
                    model_path=entry["path"],
                    n_ctx=2048,
                    n_batch=len(ids),
                    n_ubatch=512,
                    n_threads=args.threads,
                    n_threads_batch=args.threads,
                    flash_attn=fa,
                    n_gpu_layers=0,
                    verbose=False,
                )
                one_pass(llm, ids, new_tokens)  # warm-up, untimed
            except Exception as exc:  # a failed instance is reported, the rest still run
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            instances[name] = (quant, fa, llm)
    if args.only and args.only not in instances:  # say why here: the caller sees only the code
        print(f"llama.cpp: no instance {args.only!r}: {errors.get(args.only, 'no such name')}",
              file=sys.stderr)
        sys.exit(1)
    passes: dict[str, list[dict]] = {name: [] for name in instances}
    for r in range(args.repeats):
        for name, (_, _, llm) in instances.items():
            passes[name].append(one_pass(llm, ids, new_tokens))
            p = passes[name][-1]
            print(
                f"llama.cpp {name} #{r + 1}: prefill {p['prefill_ms']:.0f} ms, "
                f"tpot {p['tpot_ms']:.1f} ms",
                file=sys.stderr,
            )
    results = {}
    for name, (quant, fa, _) in instances.items():
        results[name] = {"gguf": quant, "flash_attn": fa, **summary(passes[name])}
        results[name]["gguf_path"] = prepared["gguf"][quant]["path"]
    out = {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "threads": {"n_threads": args.threads, "n_threads_batch": args.threads},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "system_info": system_info,
        "n_batch": len(ids),
        "n_ubatch": 512,
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "results": results,
        "errors": errors,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
