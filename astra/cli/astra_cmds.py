"""`astra calibrate`, `astra finetune`, `astra eval`: make ASTRA codebooks and measure accuracy.

calibrate: training-free K-means codebooks + NAQ statistics from the model's own activations.
finetune:  task loss + beta * commitment + NAQ(lambda) + distributed class tokens (paper §3).
eval:      rows like the paper's Tables 1 and 3 (full precision vs ASTRA on N simulated devices).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from astra.cli.common import (
    add_force_arg,
    add_loss_args,
    add_search_arg,
    fail,
    int_list,
    positive_int,
    user_errors,
    write_json,
)

log = logging.getLogger("astra")

CALIBRATE_EPILOG = """\
examples:
  astra calibrate --model dinov2-s --groups 32 --codebook-size 1024
  astra calibrate --model smollm2-135m --groups 1 --point kv --kmeans-iters 5 \\
      --out sm-g1.safetensors
  astra calibrate --model smollm2-135m --groups 1 --text my-corpus.txt   # your own text
"""
FINETUNE_EPILOG = """\
examples:
  astra finetune --model dinov2-s --init dino-g32.safetensors --devices 4 --steps 200 \\
      --out dino-g32-ft.safetensors
  astra finetune --model dinov2-s --groups 1 --devices 4 --steps 100 --checkpoint ft.ckpt

Re-running with the same --checkpoint resumes at the saved step.
"""
EVAL_EPILOG = """\
examples:
  astra eval --model dinov2-s --artefacts dino-g32.safetensors dino-g32-ft.safetensors \\
      --devices 4 --limit 1000
  astra eval --model smollm2-135m --artefacts sm-g1.safetensors --devices 1,2,4 --json ppl.json
  astra eval --model smollm2-135m --artefacts sm-g1.safetensors --devices 2 --runtime --limit 8
  astra eval --model smollm2-135m --dataset moby-dick --devices 1,2
  astra eval --model /path/to/llama --artefacts art.safetensors --text my-notes.txt

Text models are measured on held-out Jane Austen (--dataset austen, the default), held-out
Moby-Dick (--dataset moby-dick), or a UTF-8 file of yours (--text FILE, used whole, cut into
--seq-len windows). Every window is tokenized as `astra run` and `astra serve` tokenize a
prompt: it starts with the tokenizer's own BOS when the tokenizer adds one (never scored).

Rows are computed with the single-process simulation of N devices (the paper's Eq. 1), or
with --runtime (decoders) through a persistent group of N real worker processes, the same
runtime `astra run` and `astra serve` use: the accuracy of what is deployed.

bits/token and compression are for the whole model: blocks x codebooks per block x G x log2 K
bits per token, against blocks x width x 32 bits for fp32, where width is D (hidden point) or
2 x Dkv (kv point: keys and values).
"""


# -- shared flags -------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="prepared model name (see `astra models list`) or a local HF-format dir",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=112,
        help="ViT input side in pixels (default 112: 8x8 patches of 14 px + CLS)",
    )
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=256,
        help="tokens per sequence for text models (default 256)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="sequences or images per batch (default 16)",
    )
    p.add_argument(
        "--probe-images",
        type=positive_int,
        default=10000,
        help="Fashion-MNIST training images the full-precision linear head is fitted "
        "on, once per model and image size, then cached (default 10000)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _add_quant_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--groups",
        type=positive_int,
        required=required,
        default=None if required else 32,
        help="VQ groups G per token (must divide the quantized width)"
        + ("" if required else "; without --init (default 32)"),
    )
    p.add_argument(
        "--codebook-size",
        type=int,
        default=1024,
        help="codes per group K, >= 2 (default 1024 = 10 bits)",
    )
    p.add_argument(
        "--point",
        choices=["hidden", "kv"],
        default=None,
        help="quantization point: block attention input, or keys+values "
        "(default: the task's, kv for decoders, hidden otherwise)",
    )
    p.add_argument(
        "--sequences",
        type=positive_int,
        default=64,
        help="training sequences/images whose activations calibrate (default 64)",
    )
    p.add_argument(
        "--max-samples",
        type=positive_int,
        default=16384,
        help="vectors per codebook used by K-means, subsampled (default 16384)",
    )
    p.add_argument(
        "--kmeans-iters",
        type=int,
        default=20,
        help="Lloyd iterations after k-means++ seeding, at most: they stop at a fixed point "
        "(default 20)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _class_tokens_arg(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--class-tokens",
        choices=["distributed", "single", "none"],
        default=None,
        help="distributed: one replica per device, mean-pooled (paper §3.4); single: "
        f"on device 0, quantized like any token; none ({default_help})",
    )


def _add_text_args(p: argparse.ArgumentParser, used_for: str) -> None:
    from astra.datasets import TEXTS

    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--dataset",
        choices=tuple(TEXTS),
        default=None,
        help=f"text models: the built-in text {used_for}, cut into train/val/test at chapter "
        "headings (default austen: Jane Austen's six novels; moby-dick: Melville's novel)",
    )
    group.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help=f"text models: a UTF-8 plain-text file of yours {used_for}, used whole "
        "(no split), cut into --seq-len token windows",
    )


# -- parsers ------------------------------------------------------------------------------------


def add_calibrate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "calibrate",
        help="training-free ASTRA codebooks (K-means) + NAQ noise, as an artefact",
        description=__doc__,
        epilog=CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    _add_quant_args(p, required=True)
    _class_tokens_arg(p, "default: the task's, distributed for ViT/DINOv2")
    _add_text_args(p, "whose activations calibrate the codebooks")
    p.add_argument(
        "--out",
        default=None,
        metavar="PATH",
        help="artefact to write (default: a descriptive name under $ASTRA_HOME/artefacts)",
    )
    add_force_arg(p)
    p.set_defaults(runner=run_calibrate)
    return p


def add_finetune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="fine-tune model + codebooks under ASTRA on N simulated devices",
        description=__doc__,
        epilog=FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument(
        "--init",
        default=None,
        metavar="ARTEFACT",
        help="artefact to start from (`astra calibrate`); default: calibrate first "
        "with --groups/--codebook-size/--point and the calibration flags",
    )
    _add_quant_args(p, required=False)
    _class_tokens_arg(p, "default: the init artefact's, else the task's")
    p.add_argument(
        "--devices",
        type=positive_int,
        default=4,
        help="simulated devices N during training (default 4)",
    )
    p.add_argument("--steps", type=positive_int, default=200, help="optimizer steps (default 200)")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-5,
        help="peak AdamW learning rate, warmed up then cosine-decayed to 0 (default 1e-5; "
        "DINOv2-S with its cached linear head needed ~2e-6)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="linear warm-up steps (default: a tenth of --steps)",
    )
    p.add_argument(
        "--beta", type=float, default=2e-4, help="commitment weight beta of Eq. 2 (default 2e-4)"
    )
    p.add_argument(
        "--lam",
        type=float,
        default=1.0,
        help="NAQ noise scale lambda in [0, 1], training only (default 1.0)",
    )
    p.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of KL(full-precision teacher || student) on the outputs "
        "(default 0 = off; the embedding task always distils)",
    )
    p.add_argument(
        "--placement",
        choices=["contiguous", "random", "mixed"],
        default="contiguous",
        help="token-to-device assignment while training; mixed alternates (default contiguous)",
    )
    p.add_argument(
        "--train-limit",
        type=positive_int,
        default=None,
        help="cycle over only the first N training images/sequences",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="training state, saved every --checkpoint-every steps; resumed if present",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=50,
        help="steps between checkpoints (default 50)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="ARTEFACT",
        help="artefact with codebooks + fine-tuned weights (+ linear head) "
        "(default: a descriptive name under $ASTRA_HOME/artefacts)",
    )
    add_force_arg(p)
    p.set_defaults(runner=run_finetune)
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="accuracy of full precision vs ASTRA artefacts on N simulated devices",
        description=__doc__,
        epilog=EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument(
        "--artefacts",
        nargs="*",
        default=[],
        metavar="ARTEFACT",
        help="artefacts from `astra calibrate` / `astra finetune` (none: full precision only)",
    )
    p.add_argument(
        "--devices",
        type=int_list,
        default=[4],
        help="comma-separated device counts, e.g. 1,2,4 (default 4)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="evaluate on the first N test images/sequences (default: all)",
    )
    p.add_argument(
        "--split",
        choices=["val", "test"],
        default="test",
        help="data split (default test; a --text file is used whole)",
    )
    _add_text_args(p, "to measure on")
    p.add_argument("--no-full-precision", action="store_true", help="skip the full-precision row")
    p.add_argument(
        "--runtime",
        action="store_true",
        help="decoders: score ASTRA through N real worker processes (astra.group.Group) "
        "instead of the single-process simulation",
    )
    add_search_arg(p)
    add_loss_args(p, many=True)
    p.set_defaults(runner=run_eval)
    return p


# -- shared steps -------------------------------------------------------------------------------


def make_task(model, model_dir, config):  # a seam for tests (synthetic tasks on tiny models)
    from astra.tasks import make_task as _make_task

    return _make_task(model, model_dir, config)


def _task_config(args):
    from astra.tasks import TaskConfig

    return TaskConfig(
        image_size=args.image_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        probe_train_images=args.probe_images,
        dataset=getattr(args, "dataset", None) or "austen",
        text_file=getattr(args, "text", None),
    )


def check_text(args, model_dir: Path, split: str) -> None:
    """Before the model is loaded: a text model's windows fit its context, and the text the
    user chose (--text FILE, --dataset NAME) is there and holds at least one window."""
    from astra import datasets
    from astra.models import context_length, load_tokenizer, model_kind
    from astra.text import windows

    kind = model_kind(model_dir)
    chosen = "--text" if args.text else "--dataset" if args.dataset else None
    if kind == "image-encoder":
        if chosen:
            raise ValueError(
                f"{chosen}: {args.model} is a ViT, measured on Fashion-MNIST images; "
                "text applies to decoders and text encoders"
            )
        return
    limit = context_length(model_dir)
    if limit is not None and args.seq_len > limit:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the model's context of {limit} tokens "
            f"(max_position_embeddings of {model_dir.name}); use --seq-len {limit} or fewer"
        )
    if args.dataset:
        datasets.builtin_text(args.dataset, split)  # DataNotFoundError names the set-up step
    if args.text:
        if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            raise ValueError(f"--text: {args.model} has no tokenizer to read text with")
        try:
            text = datasets.read_text_file(args.text)
        except datasets.DataNotFoundError as exc:
            raise datasets.DataNotFoundError(f"--text {exc}") from None
        except ValueError as exc:
            raise ValueError(f"--text {exc}") from None
        try:
            windows(load_tokenizer(model_dir), text, args.seq_len, 1, closed=kind != "decoder")
        except ValueError as exc:
            raise ValueError(
                f"--text {args.text}: {exc}; use a longer file or a smaller --seq-len"
            ) from None


def _data_tag(args) -> str:
    """Artefact-name suffix for codebooks calibrated on another text than Austen's."""
    import re

    if args.text:
        return "-text-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(args.text).stem)
    return f"-{args.dataset}" if args.dataset and args.dataset != "austen" else ""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)


def _artefact_dir() -> Path:
    from astra.hub import cache_dir

    return cache_dir() / "artefacts"


def _tag(model_dir: Path) -> str:
    from astra.hub import model_checksum

    return f"{model_dir.name}-{model_checksum(model_dir)[:12]}"


def probe_cache_path(model_dir: Path, task) -> Path:
    """Where the full-precision linear head lives: keyed by model checksum, image size and the
    number of images it was fitted on."""
    c = task.config
    name = f"probe-{_tag(model_dir)}-{c.image_size}px-{c.probe_train_images}.safetensors"
    return _artefact_dir() / name


def ensure_probe_(task, model, model_dir: Path, probe_state: dict | None, progress: bool) -> str:
    """Give an image task its head: a fine-tuned one from an artefact, else the cached (or now
    fitted) full-precision one. Returns where it came from."""
    if not hasattr(task, "fit_probe_"):
        return "-"
    if probe_state is not None:
        task.probe.load_state_dict(probe_state)
        return "fine-tuned (artefact)"
    path = probe_cache_path(model_dir, task)
    task.fit_probe_(model, path, progress=progress)
    return f"full precision ({path.name})"


def _astra_config(args, task, base: dict | None = None):
    from astra.parallel.config import AstraConfig

    fields = dict(base or {})
    if base is None:
        fields.update(
            quant_point=args.point or task.quant_point,
            num_groups=args.groups,
            codebook_size=args.codebook_size,
        )
    fields["class_tokens"] = args.class_tokens or fields.get("class_tokens", task.class_tokens)
    return AstraConfig(**fields)


def _check_quant_flags(args) -> None:
    from astra.parallel.config import AstraConfig

    # before any model is loaded: K, G and the point are checked by AstraConfig itself
    AstraConfig(
        quant_point=args.point or "hidden",
        num_groups=args.groups or 1,
        codebook_size=args.codebook_size,
    )
    if args.kmeans_iters < 0:
        raise ValueError(f"--kmeans-iters must be >= 0, got {args.kmeans_iters}")


def calibrate_model(args, model, model_dir: Path, task, progress: bool):
    """apply_astra + calibrate_ from the parsed flags; returns (astra, report)."""
    from astra.parallel.simulate import apply_astra
    from astra.parallel.train import calibrate_

    astra = apply_astra(model, _astra_config(args, task))  # G not dividing the width fails here
    report = calibrate_(
        astra,
        task,
        num_sequences=args.sequences,
        max_samples=args.max_samples,
        kmeans_iters=args.kmeans_iters,
        seed=args.seed,
        progress=progress,
    )
    return astra, report


def print_calibration(report: dict) -> None:
    errors = report["relative_error_per_block"]
    flat = [e for block in errors for e in block]
    print(
        "\nrelative quantization error ||x - x_hat||^2 / ||x||^2 per block"
        + (" (keys, values)" if len(errors[0]) == 2 else "")
    )
    for i, block in enumerate(errors):
        print(f"  block {i:>2}: " + "  ".join(f"{e:.4f}" for e in block))
    print(f"  mean {sum(flat) / len(flat):.4f}  min {min(flat):.4f}  max {max(flat):.4f}")


def quant_summary(astra) -> dict:
    """Whole-model bits per token and compression against fp32 (see EVAL_EPILOG)."""
    from astra.parallel.quantizer import quant_dims

    cfg = astra.config
    blocks = list(astra.model.blocks)
    widths = [sum(quant_dims(b.attn.inner, cfg)) for b in blocks]
    bits = len(blocks) * cfg.codebooks_per_block * cfg.num_groups * cfg.bits_per_code
    fp32 = sum(widths) * 32
    return {
        "num_blocks": len(blocks),
        "width": widths[0],
        "bits_per_token": bits,
        "fp32_bits_per_token": fp32,
        "compression": fp32 / bits,
    }


# -- calibrate ----------------------------------------------------------------------------------


def run_calibrate(args) -> int:
    _setup_logging()
    try:
        summary = calibrate_command(args)
    except user_errors() as exc:
        return fail(str(exc))
    write_json(args.json, summary)
    return 0


def calibrate_command(args) -> dict:
    from astra.hub import resolve_model
    from astra.models import load_model
    from astra.parallel.artefact import save_artefact

    _check_quant_flags(args)
    model_dir = resolve_model(args.model)
    config = _task_config(args)
    check_text(args, model_dir, "train")
    model = load_model(model_dir)
    task = make_task(model, model_dir, config)
    progress = not args.no_progress
    astra, report = calibrate_model(args, model, model_dir, task, progress)
    cfg = astra.config
    out = (
        Path(args.out)
        if args.out
        else _artefact_dir()
        / (
            f"{_tag(model_dir)}-{cfg.quant_point}-g{cfg.num_groups}-k{cfg.codebook_size}"
            f"-{cfg.class_tokens}-calibrated{_data_tag(args)}.safetensors"
        )
    )
    extra = {
        "mode": "calibrated",
        "task": task.name,
        "calibration": {
            "sequences": args.sequences,
            "max_samples": args.max_samples,
            "kmeans_iters": args.kmeans_iters,
            "seed": args.seed,
            **report,
        },
    }
    save_artefact(out, astra, model_dir, extra=extra)
    print_calibration(report)
    print(f"\nartefact {out}")
    return {
        "model": args.model,
        "model_dir": str(model_dir),
        "artefact": str(out),
        "config": cfg.to_dict(),
        **quant_summary(astra),
        **extra["calibration"],
    }


# -- finetune -----------------------------------------------------------------------------------


def run_finetune(args) -> int:
    _setup_logging()
    try:
        summary = finetune_command(args)
    except user_errors() as exc:
        return fail(str(exc))
    write_json(args.json, summary)
    return 0


def finetune_command(args) -> dict:
    from astra.hub import resolve_model
    from astra.models import load_model
    from astra.parallel.artefact import read_artefact, save_artefact
    from astra.parallel.simulate import apply_astra
    from astra.parallel.train import finetune

    if not 0.0 <= args.lam <= 1.0:
        raise ValueError(f"--lam must be in [0, 1], got {args.lam}")
    if args.beta < 0 or args.lr <= 0 or args.distill < 0:
        raise ValueError("--beta and --distill must be >= 0 and --lr > 0")
    if args.init is None:
        _check_quant_flags(args)
    model_dir = resolve_model(args.model)
    blob = read_artefact(args.init, model_dir) if args.init else None  # refuses other models
    model = load_model(model_dir)
    task = make_task(model, model_dir, _task_config(args))
    progress = not args.no_progress
    resuming = args.checkpoint is not None and Path(args.checkpoint).is_file()
    if blob is None and resuming:  # the checkpoint holds the codebooks: skip K-means
        astra = apply_astra(model, _astra_config(args, task))
        init_desc = f"resumed from {args.checkpoint}"
    elif blob is None:
        astra, _ = calibrate_model(args, model, model_dir, task, progress)
        init_desc = "calibrated now"
    else:
        astra = apply_astra(model, _astra_config(args, task, blob["config"]))
        astra.quantizers.load_state_dict(blob["quantizers"])
        if blob.get("model_weights") is not None:
            astra.model.load_state_dict(blob["model_weights"])
        init_desc = str(args.init)
    # beta and lambda are training-time settings: set them on the loaded quantizers
    cfg = replace(astra.config, commitment_weight=args.beta, noise_lambda=args.lam)
    astra.config = cfg
    for quantizer in astra.quantizers:
        quantizer.noise_lambda = args.lam
        for cb in quantizer.codebooks:
            cb.config = replace(cb.config, commitment_weight=args.beta)
    probe_from = ensure_probe_(
        task, model, model_dir, (blob or {}).get("extra", {}).get("probe"), progress
    )
    history = finetune(
        astra,
        task,
        num_devices=args.devices,
        steps=args.steps,
        lr=args.lr,
        placement_kind=args.placement,
        distill_weight=args.distill,
        train_limit=args.train_limit,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        warmup_steps=args.warmup,
        seed=args.seed,
        progress=progress,
    )
    out = (
        Path(args.out)
        if args.out
        else _artefact_dir()
        / (
            f"{_tag(model_dir)}-{cfg.quant_point}-g{cfg.num_groups}-k{cfg.codebook_size}"
            f"-{cfg.class_tokens}-ft{args.devices}x{args.steps}.safetensors"
        )
    )
    settings = {
        k: getattr(args, k)
        for k in (
            "devices",
            "steps",
            "lr",
            "warmup",
            "beta",
            "lam",
            "distill",
            "placement",
            "train_limit",
            "seed",
            "image_size",
            "seq_len",
            "batch_size",
        )
    }
    extra = {
        "mode": "fine-tuned",
        "task": task.name,
        "init": init_desc,
        "finetune": settings,
        "final_loss": history[-1]["loss"] if history else None,
    }
    if hasattr(task, "probe"):
        extra["probe"] = {k: v.detach().clone() for k, v in task.probe.state_dict().items()}
    save_artefact(out, astra, model_dir, include_weights=True, extra=extra)
    last = history[-1] if history else {}
    print(
        f"\nfine-tuned {len(history)} steps (init {init_desc}, head {probe_from}); "
        f"final loss {last.get('loss', float('nan')):.4f}"
    )
    print(f"artefact {out}")
    return {
        "model": args.model,
        "model_dir": str(model_dir),
        "artefact": str(out),
        "config": cfg.to_dict(),
        "settings": settings,
        "init": init_desc,
        "history": history,
    }


# -- eval ---------------------------------------------------------------------------------------


def run_eval(args) -> int:
    _setup_logging()
    try:
        summary = eval_command(args)
    except user_errors() as exc:
        return fail(str(exc))
    print()
    print(markdown_table(summary["rows"], summary["metric"]))
    write_json(args.json, summary)
    return 0


METHOD_NAMES = {"calibrated": "ASTRA calibrated", "fine-tuned": "ASTRA fine-tuned"}


def eval_command(args) -> dict:
    from astra.hub import resolve_model
    from astra.models import load_model
    from astra.net.link import LinkConfig
    from astra.net.packets import PacketChannel
    from astra.parallel.artefact import read_artefact
    from astra.parallel.config import AstraConfig
    from astra.parallel.passes import search_kind
    from astra.parallel.placement import PlacementConfig
    from astra.parallel.quantizer import set_search_
    from astra.parallel.simulate import apply_astra
    from astra.parallel.train import evaluate

    model_dir = resolve_model(args.model)
    blobs = [read_artefact(a, model_dir) for a in args.artefacts]  # refuse before any work
    progress = not args.no_progress
    config = _task_config(args)
    check_text(args, model_dir, args.split)
    # the full-precision model: the reference row and the embedding task's reference outputs
    model = load_model(model_dir)
    task = make_task(model, model_dir, config)
    point = blobs[0]["config"]["quant_point"] if blobs else task.quant_point
    reference = apply_astra(model, AstraConfig(quant_point=point, num_groups=1, codebook_size=2))
    fp_probe = ensure_probe_(task, reference.model, model_dir, None, progress)
    fp_probe_state = (
        {k: v.clone() for k, v in task.probe.state_dict().items()}
        if hasattr(task, "probe")
        else None
    )
    rows = []
    kw = {"split": args.split, "limit": args.limit, "reference": reference, "progress": progress}
    if args.text or args.dataset:
        where = "the whole file" if args.text else f"the {args.split} split"
        log.info("measuring %s on %s (%s)", task.metric, args.text or args.dataset, where)
    if not args.no_full_precision:
        metric = evaluate(reference, task, None, **kw)
        q = quant_summary(reference)
        rows.append(
            {
                "method": "full precision",
                "artefact": None,
                "devices": 1,
                "groups": None,
                "codebook_size": None,
                "quant_point": None,
                "class_tokens": None,
                "bits_per_token": q["fp32_bits_per_token"],
                "compression": None,
                "metric": metric,
                "head": fp_probe,
            }
        )
        log.info("full precision: %s %.4f", task.metric, metric)
    for path, blob in zip(args.artefacts, blobs):
        astra = apply_astra(load_model(model_dir), AstraConfig(**blob["config"]))
        astra.quantizers.load_state_dict(blob["quantizers"])
        set_search_(astra.quantizers, search_kind(args.search))  # as the runtime's senders
        if blob.get("model_weights") is not None:
            astra.model.load_state_dict(blob["model_weights"])
        probe_state = blob.get("extra", {}).get("probe")
        head = "-"
        if fp_probe_state is not None:
            task.probe.load_state_dict(probe_state or fp_probe_state)
            head = "fine-tuned (artefact)" if probe_state is not None else fp_probe
        q = quant_summary(astra)
        mode = blob.get("extra", {}).get("mode", "calibrated")
        for n, rate in itertools.product(args.devices, args.loss):
            if n == 1 and rate > 0:
                continue  # one device sends nothing: nothing to lose
            link = LinkConfig(loss_rate=rate, loss_parity=args.parity)
            if args.runtime:
                metric = _runtime_perplexity(args.model, path, n, task, args, progress, link)
            else:
                loss = PacketChannel.for_link(link)
                metric = evaluate(astra, task, PlacementConfig(n), loss=loss, **kw)
            rows.append(
                {
                    "method": METHOD_NAMES.get(mode, mode),
                    "artefact": str(path),
                    "devices": n,
                    "groups": astra.config.num_groups,
                    "codebook_size": astra.config.codebook_size,
                    "quant_point": astra.config.quant_point,
                    "class_tokens": astra.class_tokens,
                    "bits_per_token": q["bits_per_token"],
                    "compression": q["compression"],
                    "metric": metric,
                    "head": head,
                    "runtime": "processes" if args.runtime else "simulation",
                    "search": search_kind(args.search),
                    "loss": rate,
                    "parity": args.parity if rate > 0 else None,
                }
            )
            log.info("%s x%d loss %g: %s %.4f", Path(path).name, n, rate, task.metric, metric)
    q = quant_summary(reference)
    return {
        "model": args.model,
        "model_dir": str(model_dir),
        "task": task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "split": "whole file" if args.text else args.split,
        "limit": args.limit,
        "task_config": vars(config),
        "num_blocks": q["num_blocks"],
        "bits_note": "bits/token = blocks x codebooks/block x G x log2K; compression vs "
        "fp32 = blocks x width x 32 / bits, width = D (hidden) or 2*Dkv (kv)",
        "rows": rows,
    }


def _runtime_perplexity(
    model: str, artefact, devices: int, task, args, progress: bool, link
) -> float:
    """Perplexity of `artefact` on `devices` real worker processes: every sequence is one
    Group.score request (distributed prefill, each device scores its own tokens)."""
    import math

    from tqdm.auto import tqdm

    from astra.group import Group, GroupConfig, QuantConfig

    if task.metric != "perplexity":
        raise ValueError(
            f"--runtime scores decoders (perplexity); {model} is scored by {task.metric}"
        )
    rows = [row for batch in task.batches(args.split, args.limit) for row in batch["input_ids"]]
    config = GroupConfig(
        model=model,
        devices=devices,
        method="astra",
        methods=("astra",),
        link=link,  # accuracy depends only on what the link loses
        quant=QuantConfig(artefact=str(artefact), search=args.search),
        peer_timeout_s=120.0,
        reform=False,  # a score computed on fewer devices would be another row
    )
    total, count = 0.0, 0
    with Group(config, warmup_inputs={"input_ids": rows[0][None]}) as group:
        for row in tqdm(rows, desc=f"runtime x{devices}", disable=not progress):
            scored = group.score(row.tolist())
            total, count = total + scored.nll_sum, count + scored.num_predicted
    return math.exp(total / max(count, 1))


def markdown_table(rows: list[dict], metric: str) -> str:
    lossy = any(r.get("loss") for r in rows)
    lines = [
        "| method | artefact | devices | point | G | K | bits/token | compression | "
        + ("packet loss | " if lossy else "")
        + f"{metric} |",
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if lossy else "") + "---:|",
    ]
    for r in rows:
        comp = "-" if r["compression"] is None else f"{r['compression']:.1f}x"
        name = "-" if r["artefact"] is None else Path(r["artefact"]).name
        value = r["metric"]
        shown = f"{value:.2f}" if metric in ("top1", "perplexity") else f"{value:.4f}"
        if not math.isfinite(value):
            shown = str(value)
        lines.append(
            f"| {r['method']} | {name} | {r['devices']} | {r['quant_point'] or '-'} | "
            f"{r['groups'] or '-'} | {r['codebook_size'] or '-'} | {r['bits_per_token']:,} | "
            f"{comp} | " + (f"{r.get('loss') or 0:.0%} | " if lossy else "") + f"{shown} |"
        )
    return "\n".join(lines)
