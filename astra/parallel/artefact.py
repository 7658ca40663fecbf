"""Saved ASTRA artefacts: codebooks, NAQ statistics, optionally fine-tuned weights.

Every artefact carries the checksum of the model it was made from and refuses to load onto
another one: codebooks fitted to one model's activations are silently wrong on any other.
Artefacts are safetensors files with a checked SHA-256 (astra.storage): loading one runs no code.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from astra import __version__
from astra.hub import model_checksum
from astra.parallel.config import AstraConfig
from astra.parallel.simulate import AstraModel, apply_astra
from astra.storage import StoredFileError, load_tensors, save_tensors

FORMAT = "astra-artefact/2"  # /1 was a pickle, no longer loaded


class ArtefactMismatchError(ValueError):
    """An artefact was made for another model (checksum) or is not an Astra artefact."""


def save_artefact(
    path: str | Path,
    astra: AstraModel,
    model_dir: str | Path,
    *,
    include_weights: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write codebooks + NAQ state (and the fine-tuned model weights if asked) to `path`."""
    blob = {
        "format": FORMAT,
        "astra_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_checksum": model_checksum(model_dir),
        "model_dir": str(model_dir),
        "config": astra.config.to_dict(),
        "quantizers": astra.quantizers.state_dict(),
        "model_weights": _base_state(astra) if include_weights else None,
        "extra": extra or {},
    }
    return save_tensors(path, blob, kind=FORMAT)


def read_artefact(path: str | Path, model_dir: str | Path) -> dict:
    """Load and check an artefact against the model in `model_dir`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ASTRA artefact at {path} (make one with `astra calibrate`)")
    try:
        blob = load_tensors(path, kind=FORMAT)
    except StoredFileError as exc:
        raise ArtefactMismatchError(str(exc)) from None
    expected = model_checksum(model_dir)
    if blob["model_checksum"] != expected:
        raise ArtefactMismatchError(
            f"{path} was made for the model with checksum {blob['model_checksum'][:16]}... "
            f"({blob.get('model_dir')}), not for {model_dir} (checksum {expected[:16]}...); "
            f"calibrate codebooks for this model with `astra calibrate --model {model_dir}`"
        )
    return blob


def codebook_summary(path: str | Path, model_dir: str | Path) -> dict:
    """What a result record says of an artefact's codebooks (the ones that actually run,
    whatever flags were given), plus its class-token mode."""
    cfg = read_artefact(path, model_dir)["config"]
    return {
        "groups": cfg["num_groups"],
        "codebook_size": cfg["codebook_size"],
        "quant_point": cfg["quant_point"],
        "class_tokens": cfg["class_tokens"],
    }


def load_astra(path: str | Path, model: nn.Module, model_dir: str | Path) -> AstraModel:
    """The model with ASTRA applied and the artefact's codebooks (and weights) loaded."""
    blob = read_artefact(path, model_dir)
    astra = apply_astra(model, AstraConfig(**blob["config"]))
    astra.quantizers.load_state_dict(blob["quantizers"])
    astra.fine_tuned = blob.get("model_weights") is not None
    if astra.fine_tuned:
        astra.model.load_state_dict(blob["model_weights"])
    return astra


def _base_state(astra: AstraModel) -> dict:
    """The wrapped base model's weights (attention under `.inner`): loads into apply_astra's
    output for the same model."""
    return astra.model.state_dict()
