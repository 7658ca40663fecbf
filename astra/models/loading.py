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

from astra.models.bert import Bert, BertConfig
from astra.models.gpt2 import GPT2, GPT2Config
from astra.models.llama import Llama, LlamaConfig
from astra.models.vit import ViT, ViTConfig

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (ViTConfig, ViT),
    "dinov2": (ViTConfig, ViT),
    "bert": (BertConfig, Bert),
    "gpt2": (GPT2Config, GPT2),
    "llama": (LlamaConfig, Llama),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_L = r"encoder\.layer\.(\d+)\."  # HF encoder layer prefix (ViT, DINOv2, BERT)
_VIT_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
    (_L + r"attention\.attention\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2"),
    (_L + r"attention\.attention\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2"),
    (_L + r"attention\.attention\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    # transformers >= 5 in-memory names, in case a checkpoint was written without conversion
    (_L + r"attention\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_L + r"(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_L + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_L + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.lambda1"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_BERT_RULES = [
    (r"embeddings\.word_embeddings\.weight", "word_embed.weight"),
    (r"embeddings\.position_embeddings\.weight", "pos_embed.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "type_embed.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embed_norm.\1"),
    (_L + r"attention\.self\.query\.(weight|bias)", r"blocks.\1.attn.q_proj.\2"),
    (_L + r"attention\.self\.key\.(weight|bias)", r"blocks.\1.attn.k_proj.\2"),
    (_L + r"attention\.self\.value\.(weight|bias)", r"blocks.\1.attn.v_proj.\2"),
    (_L + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    (_L + r"attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln1.\2"),
    (_L + r"intermediate\.dense\.(weight|bias)", r"blocks.\1.fc1.\2"),
    (_L + r"output\.dense\.(weight|bias)", r"blocks.\1.fc2.\2"),
    (_L + r"output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln2.\2"),
]
_GPT2_RULES = [
    (r"(wte|wpe)\.weight", r"\1.weight"),
    (r"ln_f\.(weight|bias)", r"ln_f.\1"),
    (r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),  # split below
    (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.fc.\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.proj.\2"),
]
_LLAMA_RULES = [
    (r"embed_tokens\.weight", "embed_tokens.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.mlp\.((?:gate|up|down)_proj)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.mlp_norm.weight"),
]
# family -> (base-model prefixes, rename rules, names we deliberately drop)
_NAME_MAPS: dict[str, tuple[tuple[str, ...], list, list[str]]] = {
    "vit": (("vit.",), _VIT_RULES, [r"pooler\..*", r"embeddings\.mask_token", r"classifier\..*"]),
    "dinov2": (("dinov2.",), _VIT_RULES, [r"embeddings\.mask_token", r"classifier\..*"]),
    "bert": (("bert.",), _BERT_RULES, [r"pooler\..*", r"embeddings\.position_ids", r"cls\..*"]),
    # attn.bias / masked_bias are causal-mask buffers in old GPT-2 files; lm_head is tied
    "gpt2": (("transformer.",), _GPT2_RULES, [r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"]),
    "llama": (("model.",), _LLAMA_RULES, [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]),
}


def read_config(path_or_config: str | Path | dict) -> dict:
    if isinstance(path_or_config, dict):
        return path_or_config
    path = Path(path_or_config)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; is it an HF-format model dir?")
    return json.loads((path / "config.json").read_text())


def model_family(path_or_config: str | Path | dict) -> str:
    """The checkpoint's model_type, checked against the families we implement."""
    model_type = read_config(path_or_config).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return model_type


def model_kind(path_or_config: str | Path | dict) -> str:
    """What the checkpoint does with an input: "decoder" (continues text), "text-encoder"
    (embeds text) or "image-encoder" (features of an image); from the model class itself."""
    model_cls = FAMILIES[model_family(path_or_config)][1]
    if model_cls.causal:
        return "decoder"
    return f"{model_cls.modality}-encoder"


def context_length(path_or_config: str | Path | dict) -> int | None:
    """The most positions the checkpoint was trained for (None: not a token sequence model)."""
    config = read_config(path_or_config)
    for key in ("max_position_embeddings", "n_positions"):
        if key in config and FAMILIES[model_family(config)][1].modality == "text":
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


def _split_gpt2(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF GPT-2 uses Conv1D (weight stored (in, out)): transpose to nn.Linear's (out, in) and
    split the fused c_attn into q/k/v."""
    out = {}
    for name, t in sd.items():
        if name.startswith("blocks.") and name.endswith(".weight") and t.dim() == 2:
            t = t.t()  # Conv1D (in, out) -> nn.Linear (out, in)
        if ".attn.qkv." in name:
            stem, kind = name.rsplit(".attn.qkv.", 1)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                out[f"{stem}.attn.{proj}.{kind}"] = part.contiguous()  # (D, D) or (D,)
        else:
            out[name] = t.contiguous()
    return out


def convert_state_dict(sd: dict[str, Tensor], family: str) -> tuple[dict[str, Tensor], list[str]]:
    """Rename HF parameters to ours; returns (converted, names that matched no rule)."""
    prefixes, rules, ignored = _NAME_MAPS[family]
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for hf_name, t in sd.items():
        name = hf_name
        for prefix in prefixes:
            name = name.removeprefix(prefix)
        if any(re.fullmatch(pat, name) for pat in ignored):
            continue
        for pat, rep in rules:
            new, n = re.subn(f"^{pat}$", rep, name)
            if n:
                out[new] = t
                break
        else:
            unknown.append(hf_name)
    if family == "gpt2":
        out = _split_gpt2(out)
    return out, unknown


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build our model from a local HF-format directory and load its weights (eval mode)."""
    config = read_config(path)
    family = model_family(config)
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls.from_hf(config)
    # build with `dtype` as default so parameters are created in it while buffers that ask for
    # fp32 explicitly (RoPE inv_freq) stay fp32, as HF does
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(cfg)
    finally:
        torch.set_default_dtype(previous)

    sd, unknown = convert_state_dict(read_state_dict(path), family)
    expected = model.state_dict()
    tied_to = {"gpt2": "wte.weight", "llama": "embed_tokens.weight"}.get(family)
    if tied_to and model.lm_head.weight is model.get_parameter(tied_to):
        # a tied head shares the embedding, whatever (if anything) the file stores for it
        sd.pop("lm_head.weight", None)
        if tied_to in sd:
            sd["lm_head.weight"] = sd[tied_to]
    unexpected = unknown + [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd]
    if unexpected or missing:
        raise ValueError(
            f"weights in {str(path)!r} do not fit {model_cls.__name__} ({family}): "
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
