"""GPT-2: learned positions, pre-LN, Conv1D weights (transposed and split on load)."""

from __future__ import annotations

from torch import Tensor

from astra.models.gpt2 import GPT2, GPT2Config
from astra.models.spec import FamilySpec, WeightMap

_RULES = (
    (r"(wte|wpe)\.weight", r"\1.weight"),
    (r"ln_f\.(weight|bias)", r"ln_f.\1"),
    (r"h\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),  # split below
    (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.attn.o_proj.\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.fc.\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.proj.\2"),
)


def _split_conv1d(sd: dict[str, Tensor], cfg: GPT2Config) -> dict[str, Tensor]:
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


SPEC = FamilySpec(
    name="gpt2",
    model_types=("gpt2",),
    config_from_hf=GPT2Config.from_hf,
    model_cls=GPT2,
    # attn.bias / masked_bias are causal-mask buffers in old GPT-2 files; lm_head is tied
    weights=WeightMap(
        ("transformer.",), _RULES, (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
        convert=_split_conv1d,
    ),
    task="language-modeling",
    # multi-head attention: k and v together are twice the hidden state, so codes of the
    # block's input are the cheaper point
    quant_point="hidden",
    tied_to="wte.weight",
    summary="GPT-2: learned positions, LayerNorm, GELU MLP, tied head",
)
