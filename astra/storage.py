"""Every file Astra writes: atomically, and tensors only as safetensors (never pickle).

Two rules, from the tools users trust most (safetensors, torch's own `weights_only` guidance):

- Loading a file must not run code. Artefacts, calibration caches, probes and fine-tuning
  checkpoints are safetensors files: raw tensors plus a JSON header. The non-tensor structure
  (configs, optimizer state layout, history) rides in the header as JSON, and a SHA-256 over
  that JSON and every tensor byte is checked on load, so a truncated or tampered file is refused
  with an error that names it instead of loading garbage.
- Writing a file must not lose the previous one. Every write goes to a unique temporary name in
  the target's directory (two writers never share one), is flushed to disk, then renamed into
  place: a reader sees the old file or the new one, never half of one, and Ctrl-C mid-write
  leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

_HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on the JSON header


class StoredFileError(ValueError):
    """A file is not what Astra wrote: wrong kind, truncated, tampered with, or a pickle."""


# ---------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path`; on a clean exit it is fsynced and renamed
    onto `path`, on an exception (Ctrl-C included) it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: a name no other writer (another process, another thread) can hold
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; a normal file is what users expect
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which is not thread-safe."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


# ------------------------------------------------------------------------------- output checks


def check_output(path: str | Path | None, *, force: bool = False, flag: str = "--out") -> None:
    """Before any work: `path` can be written, and is not an existing file unless `force`.
    Raises ValueError with one line naming the path."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    if path.exists() and not force:
        raise ValueError(f"{flag} {path} already exists; pass --force to overwrite it")
    _probe_write(path, path.parent, flag)


def check_output_dir(path: str | Path | None, *, flag: str = "--out") -> None:
    """Before any work: files can be created in directory `path` (made if missing)."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; name a directory")
    _probe_write(path, path, flag)


def _probe_write(path: Path, directory: Path, flag: str) -> None:
    parent = _existing_parent(directory)
    try:  # a real probe: permission bits say nothing for root, read-only mounts or /proc
        fd, probe = tempfile.mkstemp(prefix=".astra-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({exc.strerror})") from None


def _existing_parent(path: Path) -> Path:
    """The nearest existing ancestor (the directories below it will be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# -------------------------------------------------------------------------- tensors, no pickle


def save_tensors(path: str | Path, tree: Any, kind: str) -> Path:
    """Write a nested structure of dicts, lists, tensors and JSON scalars as one safetensors
    file of kind `kind` (checked on load). Atomic; returns the path."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, tensors, {})
    structure = json.dumps(skeleton, sort_keys=True)
    # two passes: the checksum covers the tensor bytes, which sit after the header that holds it
    draft = save_safetensors(tensors, metadata={"kind": kind})
    digest = _digest(structure, draft[_data_start(draft, "new file") :])
    meta = {"kind": kind, "structure": structure, "sha256": digest}
    return write_bytes(path, save_safetensors(tensors, metadata=meta))


def load_tensors(path: str | Path, kind: str) -> Any:
    """Read a file written by save_tensors, checking its kind and checksum. Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise StoredFileError(
            f"{path} is a pickle-based PyTorch file (an older Astra's .pt); Astra does not load "
            "pickles, which can run code: make it again (astra calibrate / finetune)"
        )
    start = _data_start(data, str(path))
    try:
        header = json.loads(data[8:start])
        meta = header.get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise StoredFileError(f"{path}: unreadable safetensors header (corrupt file)") from None
    if meta.get("kind") != kind:
        raise StoredFileError(f"{path} is not {kind} (it says {meta.get('kind')!r})")
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    if len(data) - start != max(ends, default=0):
        raise StoredFileError(
            f"{path} is truncated or padded: {len(data) - start} tensor bytes, header says "
            f"{max(ends, default=0)}"
        )
    structure = meta.get("structure", "")
    if _digest(structure, data[start:]) != meta.get("sha256"):
        raise StoredFileError(f"{path} failed its SHA-256 check: the file was changed or damaged")
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors' own SafetensorError: one line, naming the file
        raise StoredFileError(f"{path}: {exc}") from None
    return _unflatten(json.loads(structure), tensors)


def _data_start(data: bytes, name: str) -> int:
    if len(data) < 8:
        raise StoredFileError(f"{name}: {len(data)} bytes, too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_LIMIT or 8 + n > len(data):
        raise StoredFileError(f"{name}: header length {n} does not fit a {len(data)}-byte file")
    return 8 + n


def _digest(structure: str, tensor_bytes: bytes) -> str:
    h = hashlib.sha256(structure.encode("utf-8"))
    h.update(tensor_bytes)
    return h.hexdigest()


def _flatten(node: Any, tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    """JSON skeleton of `node`; tensors are moved to `tensors` and referenced by name. Tensors
    that are views of the same memory (tied embeddings) are stored once."""
    if isinstance(node, torch.Tensor):
        t = node.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
               t.dtype)  # fmt: skip
        if key not in seen:
            seen[key] = f"t{len(tensors)}"
            tensors[seen[key]] = t.contiguous().clone() if not t.is_contiguous() else t.clone()
        return {"__tensor__": seen[key]}
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node) and "__tensor__" not in node:
            return {k: _flatten(v, tensors, seen) for k, v in node.items()}
        # optimizer state dicts have int keys: keep them as (key, value) pairs
        return {"__items__": [[k, _flatten(v, tensors, seen)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        return [_flatten(v, tensors, seen) for v in node]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store a {type(node).__name__} (only tensors, dicts, lists, scalars)")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__items__" in node:
            return {_key(k): _unflatten(v, tensors) for k, v in node["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k
