"""BERT-style text encoders (MiniLM): post-LN blocks, mean-pooled sentence embeddings."""

from __future__ import annotations

from astra.models.bert import Bert, BertConfig
from astra.models.spec import FamilySpec, WeightMap

_L = r"encoder\.layer\.(\d+)\."
_RULES = (
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
)

SPEC = FamilySpec(
    name="bert",
    model_types=("bert",),
    config_from_hf=BertConfig.from_hf,
    model_cls=Bert,
    weights=WeightMap(
        ("bert.",), _RULES, (r"pooler\..*", r"embeddings\.position_ids", r"cls\..*")
    ),
    task="sentence-embedding",
    quant_point="hidden",
    summary="BERT/MiniLM text encoders: post-LN, GELU, mean pooling",
)
