"""BlockQuantizer: the codebook(s) of one Transformer block and how they rebuild remote K/V.

One quantizer per block (paper §3.2: "each Transformer block has its own codebook, shared by
all devices"). The same object serves the single-process simulation and the distributed runtime,
so what the sender encodes is exactly what the receiver decodes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from astra.models.attention import Attention
from astra.parallel.config import AstraConfig
from astra.vq import GroupedCodebook, ResidualNoise


def quant_dims(attn: Attention, config: AstraConfig) -> list[int]:
    """Widths of the vectors quantized in one block: [D] for "hidden", [Dkv, Dkv] for "kv"."""
    if config.quant_point == "hidden":
        return [attn.q_proj.in_features]
    kv_width = attn.num_kv_heads * attn.head_dim
    return [kv_width, kv_width]


class BlockQuantizer(nn.Module):
    def __init__(self, dims: list[int], config: AstraConfig):
        super().__init__()
        self.point = config.quant_point
        self.noise_lambda = config.noise_lambda
        self.codebooks = nn.ModuleList(
            GroupedCodebook(
                d,
                num_groups=config.num_groups,
                codebook_size=config.codebook_size,
                ema_decay=config.ema_decay,
                commitment_weight=config.commitment_weight,
            )
            for d in dims
        )
        # NAQ noise fitted to each codebook's residual; stays at zero until calibrated
        self.noises = nn.ModuleList(ResidualNoise(d, config.num_groups) for d in dims)

    @property
    def num_groups_on_wire(self) -> int:
        """Codes per token on the wire: G for "hidden", 2G for "kv" (keys' then values')."""
        return sum(cb.config.num_groups for cb in self.codebooks)

    def inputs(self, attn: Attention, x: Tensor) -> list[Tensor]:
        """The vectors this block quantizes, each (B, T, width): what calibration records."""
        if self.point == "hidden":
            return [x]
        k, v = attn.project_kv(x)  # (B, Hkv, T, hd) each, before RoPE
        return [_merge_heads(k), _merge_heads(v)]

    # -- sender side --------------------------------------------------------------------------
    def encode(
        self,
        attn: Attention,
        x: Tensor,
        kv: tuple[Tensor, Tensor] | None = None,
        search: str | None = None,
    ) -> Tensor:
        """Attention input x (B, T, D) -> codes (B, T, G_wire): what crosses the wire.

        For the "kv" point, pass the already projected (k, v) (B, Hkv, T, hd), before RoPE, to
        avoid projecting twice. `search`: see GroupedCodebook.encode."""
        if self.point == "kv" and kv is not None:
            parts = [_merge_heads(kv[0]), _merge_heads(kv[1])]
        else:
            parts = self.inputs(attn, x)
        codes = [cb.encode(p, search) for cb, p in zip(self.codebooks, parts)]
        return torch.cat(codes, dim=-1)

    # -- receiver side ------------------------------------------------------------------------
    def decode_kv(self, attn: Attention, codes: Tensor) -> tuple[Tensor, Tensor]:
        """codes (B, T, G_wire) -> rebuilt (k_hat, v_hat), each (B, Hkv, T, hd), before RoPE."""
        splits = [cb.config.num_groups for cb in self.codebooks]
        dtype = attn.dtype  # codebooks stay float32; the model may run in bf16
        parts = [cb.decode(c, dtype) for cb, c in zip(self.codebooks, codes.split(splits, dim=-1))]
        if self.point == "hidden":
            return attn.project_kv(parts[0])
        return _split_heads(parts[0], attn.num_kv_heads), _split_heads(parts[1], attn.num_kv_heads)

    # -- training / simulation: straight-through, commitment loss, NAQ -----------------------
    def quantize_kv(self, attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> (k_hat, v_hat, commitment_loss) with gradients (straight-through).

        In training, NAQ adds λ·ξ with ξ ~ N(μ, Σ) fitted to the residual (paper §3.3);
        `ResidualNoise` is the identity in eval, so inference never sees the noise.
        """
        rebuilt, loss = [], x.new_zeros(())
        for cb, noise, part in zip(self.codebooks, self.noises, self.inputs(attn, x)):
            x_q, _, commit = cb(part)
            rebuilt.append(noise.apply(x_q, self.noise_lambda))
            loss = loss + commit
        if self.point == "hidden":
            k_hat, v_hat = attn.project_kv(rebuilt[0])
        else:
            k_hat = _split_heads(rebuilt[0], attn.num_kv_heads)
            v_hat = _split_heads(rebuilt[1], attn.num_kv_heads)
        return k_hat, v_hat, loss


def set_search_(quantizers, search: str | None) -> None:
    """Every codebook of `quantizers` runs the `search` (SEARCH_KINDS) when not told otherwise: the
    simulation then picks the codes the runtime's senders pick (astra.parallel.passes)."""
    for quantizer in quantizers:
        for codebook in quantizer.codebooks:
            codebook.search = search


def _merge_heads(t: Tensor) -> Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)  # (B, H, T, hd) -> (B, T, H*hd)


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    b, n, width = t.shape
    return t.view(b, n, num_heads, width // num_heads).transpose(1, 2)  # -> (B, H, T, hd)
