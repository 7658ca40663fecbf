"""Load any local HF-format checkpoint directory into our reference models.

A directory holds config.json plus model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin. HF parameter names (with or without the base-model prefix such as "bert." or
"model.") are renamed to ours by per-family regex rules; anything left over is an error, so a
silently half-loaded model cannot happen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from astra.models.families import spec_for
from astra.models.spec import FamilySpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_config(path_or_config: str | Path | dict) -> dict:
    if isinstance(path_or_config, dict):
        return path_or_config
    path = Path(path_or_config)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it an HF-format model dir?")
    return json.loads((path / "config.json").read_text())


def model_spec(path_or_config: str | Path | dict) -> FamilySpec:
    """The family spec that reads this checkpoint (an error names what is supported)."""
    return spec_for(read_config(path_or_config))


def model_family(path_or_config: str | Path | dict) -> str:
    """The checkpoint's family name (astra.models.families), checked against what we run."""
    return model_spec(path_or_config).name


def model_kind(path_or_config: str | Path | dict) -> str:
    """What the checkpoint does with an input: "decoder" (continues text), "text-encoder"
    (embeds text) or "image-encoder" (features of an image); from the model class itself."""
    model_cls = model_spec(path_or_config).model_cls
    if model_cls.causal:
        return "decoder"
    return f"{model_cls.modality}-encoder"


def context_length(path_or_config: str | Path | dict) -> int | None:
    """The most positions the checkpoint was trained for (None: not a token sequence model)."""
    config = read_config(path_or_config)
    if model_spec(config).model_cls.modality != "text":
        return None
    for key in ("max_position_embeddings", "n_positions"):
        if key in config:
            return int(config[key])
    return None


def num_input_tokens(path_or_config: str | Path | dict, inputs: dict) -> int:
    """Sequence length of an input: its tokens, or an image's patches plus the class token."""
    if "input_ids" in inputs:
        return int(inputs["input_ids"].shape[1])
    patch = int(read_config(path_or_config)["patch_size"])
    height, width = inputs["pixels"].shape[-2:]
    return (height // patch) * (width // patch) + 1


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        sd: dict[str, Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(path / shard))
        return sd
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{str(path)!r} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def convert_state_dict(
    sd: dict[str, Tensor], spec: FamilySpec, config=None
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename HF parameters to ours by the spec's weight map; returns (converted, names that
    matched no rule). `config` (our model config) is what a fused tensor is split by."""
    weights = spec.weights
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for hf_name, t in sd.items():
        name = hf_name
        for prefix in weights.prefixes:
            name = name.removeprefix(prefix)
        if any(re.fullmatch(pat, name) for pat in weights.ignored):
            continue
        for pat, rep in weights.rules:
            new, n = re.subn(f"^{pat}$", rep, name)
            if n:
                out[new] = t
                break
        else:
            unknown.append(hf_name)
    if weights.convert is not None:
        out = weights.convert(out, config)
    return out, unknown


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build our model from a local HF-format directory and load its weights (eval mode)."""
    config = read_config(path)
    spec = model_spec(config)
    model_cls = spec.model_cls
    cfg = spec.config_from_hf(config)
    # build with `dtype` as default so parameters are created in it while buffers that ask for
    # fp32 explicitly (RoPE inv_freq) stay fp32, as HF does
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(cfg)
    finally:
        torch.set_default_dtype(previous)

    sd, unknown = convert_state_dict(read_state_dict(path), spec, cfg)
    expected = model.state_dict()
    tied_to = spec.tied_to
    if tied_to and model.lm_head.weight is model.get_parameter(tied_to):
        # a tied head shares the embedding, whatever (if anything) the file stores for it
        sd.pop("lm_head.weight", None)
        if tied_to in sd:
            sd["lm_head.weight"] = sd[tied_to]
    unexpected = unknown + [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd]
    if unexpected or missing:
        raise ValueError(
            f"weights in {str(path)!r} do not fit {model_cls.__name__} ({spec.name}): "
            f"missing {len(missing)} [{_names(missing)}], "
            f"unexpected {len(unexpected)} [{_names(unexpected)}]"
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (transformers AutoTokenizer, never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def image_transform(
    path_or_config: str | Path | dict, size: int | None = None
) -> Callable[[object], Tensor]:
    """A callable: HxWx3 / HxW uint8 numpy array or PIL image -> normalised (3, S, S) float32.

    Mean/std/rescale come from preprocessor_config.json when the directory has one (or from a
    dict holding image_mean/image_std), else ImageNet defaults. `size` defaults to the model's
    image_size. The image is resized straight to S x S (no centre crop), bicubic unless the
    preprocessor says otherwise.
    """
    from PIL import Image

    pre: dict = {}
    model_cfg: dict = {}
    if isinstance(path_or_config, dict):
        pre = model_cfg = path_or_config
    else:
        path = Path(path_or_config)
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        if (path / "config.json").is_file():
            model_cfg = json.loads((path / "config.json").read_text())
    size = int(size or model_cfg.get("image_size") or 224)
    normalize = pre.get("do_normalize", True)
    mean = torch.tensor(pre.get("image_mean", IMAGENET_MEAN), dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre.get("image_std", IMAGENET_STD), dtype=torch.float32)[:, None, None]
    rescale = float(pre.get("rescale_factor", 1 / 255))
    resample = int(pre.get("resample", Image.BICUBIC))

    def transform(image) -> Tensor:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"expected a uint8 image array, got {image.dtype}")
            image = Image.fromarray(
                image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image
            )
        image = image.convert("RGB").resize((size, size), resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) * rescale)  # (S, S, 3)
        x = x.permute(2, 0, 1).contiguous()  # (3, S, S)
        return (x - mean) / std if normalize else x

    return transform
