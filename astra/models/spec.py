"""What the rest of Astra may ask about a model family, in one record per family.

A `FamilySpec` says how a checkpoint's config.json becomes our model config, how its weight
names become ours, which HF model_type values it reads, the task and metric it is measured
with, and ASTRA's default quantization point. The loader, the hub, tasks, run/bench/eval/serve
and the CLI read the spec of a checkpoint (astra.models.families.spec_for) and never switch on
a family name or a model class; adding a family is one module in astra/models/families/ plus
its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

TASKS = ("language-modeling", "image-classification", "sentence-embedding")
QUANT_POINTS = ("kv", "hidden")


@dataclass(frozen=True)
class WeightMap:
    """HF parameter names -> ours: strip a base-model prefix, drop names we deliberately
    ignore, rename by the first regex rule that matches, then `convert` (e.g. split a fused
    projection). Anything no rule matches is an error, so a half-loaded model cannot happen."""

    prefixes: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...] = ()
    # (renamed weights, our model config) -> weights; for fused or transposed tensors
    convert: Callable[[dict[str, Tensor], Any], dict[str, Tensor]] | None = None


@dataclass(frozen=True)
class FamilySpec:
    name: str  # what users see ("llama", "gemma3", ...)
    model_types: tuple[str, ...]  # the config.json model_type values this spec reads
    config_from_hf: Callable[[dict], Any]  # config.json dict -> our model config (checked)
    model_cls: type[nn.Module]
    weights: WeightMap
    task: str  # one of TASKS: what `astra eval` measures and `calibrate` trains on
    quant_point: str  # one of QUANT_POINTS: ASTRA's default (the paper: "kv" for GQA decoders)
    tied_to: str | None = None  # the embedding a tied LM head shares, when the config ties
    # ASTRA's class-token handling (CLASS_TOKEN_MODES): "distributed" where the output pools a
    # class token every device needs (the paper's Distributed Class Tokens, ViTs), else "none"
    class_tokens: str = "none"
    summary: str = ""  # one line for `astra models families`

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"family {self.name}: task {self.task!r} is not one of {TASKS}")
        if self.quant_point not in QUANT_POINTS:
            raise ValueError(f"family {self.name}: quant_point {self.quant_point!r} not in "
                             f"{QUANT_POINTS}")


def hf_config(class_name: str, d: dict):
    """config.json read by transformers' own config class, which fills defaults and turns
    older layouts (rope_scaling, sliding_window_pattern) into today's, so that we read a
    config exactly as transformers does."""
    import transformers

    fields = {k: v for k, v in d.items() if k not in ("model_type", "transformers_version")}
    return getattr(transformers, class_name)(**fields)


class UnsupportedModelError(ValueError):
    """A checkpoint whose model_type or features Astra does not implement."""


def unsupported(family: str, what: str, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{family}: {what} is not supported (supported: {supported})")
