"""Every model family Astra runs, one spec each (astra.models.spec.FamilySpec).

Adding a family: write its module here with a `SPEC`, list it in `SPECS`, and add its
transformers-parity test. Nothing else switches on family names.
"""

from __future__ import annotations

from astra.models.families import bert, gemma, gpt2, llama, mistral, phi3, qwen2, vit
from astra.models.spec import FamilySpec, UnsupportedModelError

SPECS: tuple[FamilySpec, ...] = (
    llama.SPEC,
    qwen2.SPEC,
    mistral.SPEC,
    phi3.SPEC,
    gemma.GEMMA2,
    gemma.GEMMA3,
    gpt2.SPEC,
    bert.SPEC,
    vit.SPEC,
)
BY_MODEL_TYPE: dict[str, FamilySpec] = {t: s for s in SPECS for t in s.model_types}
BY_NAME: dict[str, FamilySpec] = {s.name: s for s in SPECS}

__all__ = ["BY_MODEL_TYPE", "BY_NAME", "SPECS", "UnsupportedModelError", "spec_for"]


def spec_for(config: dict) -> FamilySpec:
    """The spec that reads this config.json, or an error naming what is supported."""
    model_type = config.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        hint = ""
        if model_type == "gemma3":
            hint = " (the multimodal Gemma 3; its text-only checkpoints, model_type " \
                   "'gemma3_text', are supported)"
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}{hint}; supported: "
            f"{', '.join(sorted(BY_MODEL_TYPE))}"
        )
    return BY_MODEL_TYPE[model_type]
