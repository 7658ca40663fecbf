"""Text to token ids, one rule for `astra run`, `eval`, `calibrate` and `serve`.

A prompt is tokenized as the tokenizer's own config says: the special tokens its post-processor
adds (a decoder's BOS where the checkpoint asks for one, BERT's [CLS] ... [SEP]) and nothing
else. Chat requests use the tokenizer's chat template instead (astra.group.Group.chat_prompt).
A long text is cut into windows that each look like a prompt of the same tokenizer: every
window starts with the tokens the tokenizer puts before a text (its BOS, if any), so perplexity
is measured on inputs shaped like the ones the model serves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from astra.datasets import token_blocks

_PROBE = "The probe"  # any short plain text: what the tokenizer adds around it is the rule


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one prompt, special tokens as the tokenizer's config says."""
    return list(tokenizer(text, verbose=False)["input_ids"])


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids `encode` puts before and after any text, e.g. ([bos], []) for
    a Llama tokenizer with add_bos_token, ([], []) for SmolLM2's, ([cls], [sep]) for BERT's."""
    full = encode(tokenizer, _PROBE)
    plain = list(tokenizer(_PROBE, add_special_tokens=False, verbose=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: {_PROBE!r} is "
        f"{plain} without them and {full} with them"
    )


def windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, closed: bool = False
) -> Tensor:
    """(B, seq_len) LongTensor: contiguous, non-overlapping stretches of `text` from its start,
    each wrapped like a prompt: the tokenizer's prefix (its BOS) first, and, when `closed`, its
    suffix last (a whole input, as BERT's [SEP]; a decoder's window is a slice of running text,
    so it gets no EOS). The prefix is context, never a prediction target: the first token of a
    window is never scored. A partial last window is dropped."""
    prefix, suffix = special_tokens(tokenizer)
    suffix = suffix if closed else []
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no room for text after the tokenizer's "
            f"{len(prefix) + len(suffix)} special tokens"
        )
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    try:
        ids = token_blocks(tokenizer, text, body, max_windows)
    except ValueError:  # the only one left: fewer tokens than one window
        have = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        special = f" ({body} of text + {seq_len - body} special)" if body < seq_len else ""
        raise ValueError(
            f"the text has {have} tokens, too few for one window of {seq_len} tokens{special}"
        ) from None
    n = ids.shape[0]
    parts = [torch.tensor([prefix] * n, dtype=torch.long).view(n, -1), ids]
    parts.append(torch.tensor([suffix] * n, dtype=torch.long).view(n, -1))
    return torch.cat(parts, dim=1)
