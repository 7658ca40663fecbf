"""What each model is measured on, without a hub (issue 3's metrics).

- `ImageClassification`: ViT/DINOv2 on Fashion-MNIST, top-1 of a linear head trained on the
  full-precision backbone's class token (the head is fitted once and cached per model).
- `LanguageModeling`: Llama/GPT-2 perplexity on held-out Jane Austen text (or another built-in
  text, `TaskConfig.dataset`, or the user's own file, `TaskConfig.text_file`).
- `SentenceEmbedding`: BERT (all-MiniLM-L6-v2) mean-pooled embeddings of Austen passages (or
  the same other texts), cosine similarity to the full-precision embeddings.

Text becomes token ids through astra.text, the rule `astra run` and `astra serve` use too: every
window starts with the tokenizer's own BOS when it adds one.

Every task gives batches, turns a batch into embedded tokens, and turns last hidden states into
its outputs, so calibration, fine-tuning and evaluation are written once (astra.parallel.train).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra import datasets
from astra.models import image_transform, load_tokenizer, mean_pool, model_spec
from astra.storage import load_tensors, save_tensors
from astra.text import windows

PROBE_KIND = "astra-probe/1"


@dataclass(frozen=True)
class TaskConfig:
    image_size: int = 112  # ViT input side: 112 px = 8x8 patches of 14 px + CLS = 65 tokens
    seq_len: int = 256  # tokens per sequence for language modelling and embeddings
    batch_size: int = 16
    probe_train_images: int = 10000  # images the linear head is fitted on (full precision)
    dataset: str = "austen"  # text tasks: a built-in text (datasets.TEXTS), split by chapters
    text_file: str | None = None  # text tasks: a UTF-8 file used whole instead (any split)

    def __post_init__(self) -> None:
        if self.dataset not in datasets.TEXTS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; expected one of {', '.join(datasets.TEXTS)}"
            )
        if self.image_size < 14:
            raise ValueError(f"image_size must be >= 14 pixels, got {self.image_size}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8 tokens, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class Task:
    name: str
    metric: str
    higher_is_better: bool
    class_tokens: str

    def __init__(self, model: nn.Module, model_dir: Path, config: TaskConfig):
        self.model_dir = Path(model_dir)
        self.config = config
        # ASTRA's default quantization point: the family's (its spec), not the task's
        self.quant_point = model_spec(model_dir).quant_point

    def batches(self, split: str, limit: int | None = None) -> Iterator[dict]:
        raise NotImplementedError

    def embed(self, model: nn.Module, batch: dict) -> Tensor:
        raise NotImplementedError

    def attention_mask(self, batch: dict) -> Tensor | None:
        return None


def task_text(config: TaskConfig, split: str) -> str:
    """The text a text task reads: the user's file, whole, or a built-in text's split."""
    if config.text_file is not None:
        return datasets.read_text_file(config.text_file)
    return datasets.builtin_text(config.dataset, split)


def text_name(config: TaskConfig) -> str:
    """What a text task measures on, for its name: "austen", "moby-dick", a file's name."""
    return Path(config.text_file).name if config.text_file is not None else config.dataset


class ImageClassification(Task):
    name, metric, higher_is_better = "fashion-mnist", "top1", True
    class_tokens = "distributed"

    def __init__(self, model: nn.Module, model_dir: Path, config: TaskConfig):
        super().__init__(model, model_dir, config)
        self.transform = image_transform(model_dir, config.image_size)
        self.probe = nn.Linear(model.config.dim, len(datasets.FASHION_MNIST_CLASSES))

    def batches(self, split: str, limit: int | None = None) -> Iterator[dict]:
        images, labels = datasets.fashion_mnist(split)
        n = len(labels) if limit is None else min(limit, len(labels))
        for start in range(0, n, self.config.batch_size):
            stop = min(start + self.config.batch_size, n)
            pixels = torch.stack([self.transform(im) for im in images[start:stop]])
            yield {"pixels": pixels, "labels": torch.from_numpy(labels[start:stop])}

    def embed(self, model: nn.Module, batch: dict) -> Tensor:
        return model.embed(batch["pixels"])  # (B, 1 + P, D)

    def outputs(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return self.probe(model.head(hidden)[:, 0])  # logits (B, classes) from the class token

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        return F.cross_entropy(outputs, batch["labels"])

    def score(self, outputs: Tensor, reference: Tensor | None, batch: dict) -> tuple[float, int]:
        return float((outputs.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])

    def finish(self, total: float, count: int) -> float:
        return 100.0 * total / max(count, 1)

    def fit_probe_(self, model: nn.Module, cache: Path | None, progress: bool = True) -> None:
        """Fit the linear head on full-precision class-token features (L2-regularised softmax
        regression, LBFGS), or load it from `cache` when it was fitted before."""
        if cache is not None and cache.is_file():
            self.probe.load_state_dict(load_tensors(cache, kind=PROBE_KIND))
            return
        from tqdm.auto import tqdm

        feats, labels = [], []
        n = self.config.probe_train_images
        with torch.no_grad():
            for batch in tqdm(
                self.batches("train", n),
                total=math.ceil(n / self.config.batch_size),
                desc="probe features",
                disable=not progress,
            ):
                feats.append(model(batch["pixels"])[:, 0])  # final-norm class token (B, D)
                labels.append(batch["labels"])
        x, y = torch.cat(feats), torch.cat(labels)
        mean, std = x.mean(0), x.std(0) + 1e-6
        torch.manual_seed(0)
        w = nn.Linear(x.shape[1], self.probe.out_features)
        opt = torch.optim.LBFGS(w.parameters(), lr=1.0, max_iter=200, history_size=20)
        xn = (x - mean) / std

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(w(xn), y) + 1e-4 * w.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        # fold the standardisation into the head: probe(f) = w((f - mean) / std)
        with torch.no_grad():
            self.probe.weight.copy_(w.weight / std)
            self.probe.bias.copy_(w.bias - (w.weight * (mean / std)).sum(1))
        if cache is not None:
            save_tensors(cache, self.probe.state_dict(), kind=PROBE_KIND)


class LanguageModeling(Task):
    name, metric, higher_is_better = "austen-ppl", "perplexity", False
    class_tokens = "none"

    def __init__(self, model: nn.Module, model_dir: Path, config: TaskConfig):
        super().__init__(model, model_dir, config)
        self.tokenizer = load_tokenizer(model_dir)
        self.name = f"{text_name(config)}-ppl"
        self._blocks: dict[str, Tensor] = {}

    def token_blocks(self, split: str, limit: int | None) -> Tensor:
        """(B, seq_len) windows of the split; each starts with the tokenizer's BOS if it adds
        one (never a target: `score` predicts tokens 1..T-1 of each window)."""
        key = f"{split}:{limit}"
        if key not in self._blocks:
            text = task_text(self.config, split)
            self._blocks[key] = windows(self.tokenizer, text, self.config.seq_len, limit)
        return self._blocks[key]

    def batches(self, split: str, limit: int | None = None) -> Iterator[dict]:
        ids = self.token_blocks(split, limit)
        size = min(self.config.batch_size, 4)  # (B, T, vocab) logits: 4 x 256 x 49k = 200 MB
        for start in range(0, ids.shape[0], size):
            yield {"input_ids": ids[start : start + size]}

    def embed(self, model: nn.Module, batch: dict) -> Tensor:
        ids = batch["input_ids"]
        return model.embed(ids, torch.arange(ids.shape[1]))

    def outputs(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.head(hidden)  # logits (B, T, V)

    def loss(self, outputs: Tensor, batch: dict) -> Tensor:
        ids = batch["input_ids"]
        return F.cross_entropy(outputs[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def score(self, outputs: Tensor, reference: Tensor | None, batch: dict) -> tuple[float, int]:
        ids = batch["input_ids"]
        nll = F.cross_entropy(outputs[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        return float(nll), ids[:, 1:].numel()

    def finish(self, total: float, count: int) -> float:
        return math.exp(total / max(count, 1))


class SentenceEmbedding(Task):
    name, metric, higher_is_better = "austen-embedding", "cosine", True
    class_tokens = "none"

    def __init__(self, model: nn.Module, model_dir: Path, config: TaskConfig):
        super().__init__(model, model_dir, config)
        self.tokenizer = load_tokenizer(model_dir)
        self.name = f"{text_name(config)}-embedding"

    def batches(self, split: str, limit: int | None = None) -> Iterator[dict]:
        text = task_text(self.config, split)
        ids = windows(self.tokenizer, text, self.config.seq_len, limit, closed=True)  # [CLS]..[SEP]
        for start in range(0, ids.shape[0], self.config.batch_size):
            yield {"input_ids": ids[start : start + self.config.batch_size]}

    def embed(self, model: nn.Module, batch: dict) -> Tensor:
        return model.embed(batch["input_ids"])

    def outputs(self, model: nn.Module, hidden: Tensor) -> Tensor:
        ones = torch.ones(hidden.shape[:2], dtype=torch.long)
        return F.normalize(mean_pool(model.head(hidden), ones), dim=-1)  # (B, D)

    def loss(self, outputs: Tensor, batch: dict, reference: Tensor | None = None) -> Tensor:
        if reference is None:
            raise ValueError("the embedding task trains by distillation: pass the reference")
        return (1 - (outputs * reference).sum(-1)).mean()

    def score(self, outputs: Tensor, reference: Tensor | None, batch: dict) -> tuple[float, int]:
        return float((outputs * reference).sum()), outputs.shape[0]

    def finish(self, total: float, count: int) -> float:
        return total / max(count, 1)


# FamilySpec.task -> the task that measures it
TASKS: dict[str, type[Task]] = {
    "image-classification": ImageClassification,
    "language-modeling": LanguageModeling,
    "sentence-embedding": SentenceEmbedding,
}


def make_task(model: nn.Module, model_dir: Path, config: TaskConfig | None = None) -> Task:
    return TASKS[model_spec(model_dir).task](model, model_dir, config or TaskConfig())


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
