"""ASTRA on N devices simulated in one process: the reference the distributed runtime must match.

`apply_astra(model, config)` wraps every block's attention with `MixedPrecisionAttention`
(paper Eq. 1): a query sees the exact key/value of tokens on its own device and the key/value
rebuilt from codes for tokens on other devices. Training runs this way on one machine (the
paper's mask M), and so do accuracy evaluations; the runtime in astra.parallel.runtime computes
the same numbers with real processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from astra.models.attention import Attention, causal_mask, seen_within_window, window_mask
from astra.net.packets import PacketChannel
from astra.parallel.config import AstraConfig, check_codebook_memory
from astra.parallel.placement import PlacementConfig, assign_tokens
from astra.parallel.quantizer import BlockQuantizer, quant_dims


@dataclass
class DeviceLayout:
    """Where each token of the (class-token-expanded) sequence lives."""

    device_of_token: Tensor  # (T,) int64
    sendable: Tensor  # (T,) bool: False for distributed class-token replicas, never sent
    # packets lost on the way (no retransmission): one channel per batch row, or one for all
    loss: list[PacketChannel] | None = None
    item_bits: int = 0  # bits one token's codes take per block (what packets carry)


class _Slot:
    """Shared by the wrappers of one model: the layout of the forward pass in flight.

    None means full precision (no ASTRA), which is also how calibration records activations.
    """

    def __init__(self) -> None:
        self.layout: DeviceLayout | None = None
        self.recording: list[list[Tensor]] | None = None  # per block, calibration inputs


class MixedPrecisionAttention(nn.Module):
    """Eq. 1: softmax(Q [K | K_hat]^T / sqrt(d) masked by M) [V | V_hat].

    The mask M exposes a key's exact copy only to queries on the same device and its rebuilt
    copy only to queries on other devices, combined with the model's own (causal) mask.
    """

    def __init__(self, inner: Attention, quantizer: BlockQuantizer, slot: _Slot, index: int):
        super().__init__()
        self.inner = inner
        # not a registered submodule: AstraModel.quantizers owns it, so each codebook appears
        # once in state_dict() and the base model's state keeps only the model's own weights
        object.__setattr__(self, "quantizer", quantizer)
        self.slot = slot
        self.index = index
        self.commit_loss: Tensor | None = None

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache=None):
        layout = self.slot.layout
        if layout is None:
            if self.slot.recording is not None:
                parts = self.quantizer.inputs(self.inner, x)
                self.slot.recording[self.index].append([p.detach() for p in parts])
            return self.inner(x, positions, mask, cache)
        if cache is not None:
            raise ValueError("the simulated mixed-precision attention does not use a KV cache")
        q, k, v = self.inner.project(x)  # q (B,H,T,hd); k, v (B,Hkv,T,hd)
        k_hat, v_hat, self.commit_loss = self.quantizer.quantize_kv(self.inner, x)
        q = self.inner.rotate(q, positions)
        k = self.inner.rotate(k, positions)
        k_hat = self.inner.rotate(k_hat, positions)  # remote keys rotate to the sender's positions
        mp_mask = mixed_precision_mask(
            layout, mask, x.shape[1], self.index, self.inner.window
        )  # (B|1, 1, T, 2T)
        if self.inner.window is not None:  # a sliding-window layer: exact and rebuilt alike
            both = torch.cat([positions, positions], dim=-1)  # (T2,) or (B, 2T)
            mp_mask = mp_mask & window_mask(positions, both, self.inner.window)
        return self.inner.attend(
            q, torch.cat([k, k_hat], dim=2), torch.cat([v, v_hat], dim=2), mp_mask
        )


def mixed_precision_mask(
    layout: DeviceLayout,
    mask: Tensor | None,
    num_tokens: int,
    block: int = 0,
    window: int | None = None,
) -> Tensor:
    """(B|1, 1, T, 2T) bool: first T columns the exact keys, last T the rebuilt ones."""
    dev = layout.device_of_token
    same = dev[:, None] == dev[None, :]  # (T, T)
    remote = ~same & layout.sendable[None, :]
    if layout.loss:
        # (B|1, T, T): receiver row (via its device), token column; one channel per batch row
        lost = torch.stack([lost_tokens(layout, block, ch, window)[dev] for ch in layout.loss])
        remote = remote & ~lost[:, None]  # (B|1, 1, T, T)
    if mask is None:
        mask = torch.ones(1, 1, num_tokens, num_tokens, dtype=torch.bool, device=dev.device)
    mask = mask.bool()
    exact, rebuilt = torch.broadcast_tensors(mask & same, mask & remote)  # (B|1, 1, T, T) each
    return torch.cat([exact, rebuilt], dim=-1)


def lost_tokens(
    layout: DeviceLayout, block: int, channel: PacketChannel, window: int | None = None
) -> Tensor:
    """(N, T) bool: True where receiver r lost token t's codes in `block`.

    Same packets and keys as the runtime (astra.net.packets: block, sender, receiver, packet;
    the sender's sent tokens in order, interleaved over its packets; in a sliding-window layer
    only the tokens another device's window reaches are sent, RankLayout.for_window), so the
    simulation and the distributed run lose exactly the same tokens."""
    dev, n = layout.device_of_token, int(layout.device_of_token.max()) + 1
    positions = torch.arange(dev.numel(), device=dev.device)  # windows: decoders, no replicas
    lost = torch.zeros(n, dev.numel(), dtype=torch.bool)
    for sender in range(n):
        sent = torch.nonzero((dev == sender) & layout.sendable).flatten()
        if window is not None:
            sent = sent[seen_within_window(positions[sent], positions[dev != sender], window)]
        for receiver in range(n):
            if receiver != sender and sent.numel():
                kept = channel.kept_tokens(
                    sent.numel(), layout.item_bits, block, sender, receiver
                )
                lost[receiver, sent[~kept]] = True
    return lost.to(dev.device)


class AstraModel(nn.Module):
    """A model with ASTRA applied: the base model's blocks, one BlockQuantizer per block."""

    def __init__(self, model: nn.Module, config: AstraConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.slot = _Slot()
        widths = [d for block in model.blocks for d in quant_dims(block.attn, config)]
        check_codebook_memory(widths, config)  # a clear error, not a 96 GB allocation
        self.quantizers = nn.ModuleList(
            BlockQuantizer(quant_dims(block.attn, config), config) for block in model.blocks
        )
        for i, (block, quantizer) in enumerate(zip(model.blocks, self.quantizers)):
            block.attn = MixedPrecisionAttention(block.attn, quantizer, self.slot, i)
        self.train(model.training)  # follow the base model: an eval model stays in eval

    @property
    def class_tokens(self) -> str:
        return effective_class_tokens(self.model, self.config.class_tokens)

    def attentions(self) -> list[MixedPrecisionAttention]:
        return [block.attn for block in self.model.blocks]

    def commitment_loss(self) -> Tensor:
        losses = [a.commit_loss for a in self.attentions() if a.commit_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def forward_hidden(
        self,
        x: Tensor,
        placement: PlacementConfig | None,
        attention_mask: Tensor | None = None,
        loss: PacketChannel | list[PacketChannel] | None = None,
    ) -> Tensor:
        """Embedded tokens x (B, T, D) -> last hidden states (B, T, D) before the model's head.

        With placement None (or one device) this is the full-precision model. Distributed class
        tokens (paper §3.4): the class token is replicated once per device, each replica sees its
        device's exact tokens and the other devices' rebuilt ones, and the replicas' outputs are
        mean-pooled back into one class token before the head.
        """
        num_devices = 1 if placement is None else placement.num_devices
        num_tokens = x.shape[1]
        positions = torch.arange(num_tokens, device=x.device)
        replicate = self.class_tokens == "distributed" and num_devices > 1
        if replicate:
            # (B, 1+P, D) -> (B, N+P, D): N class-token replicas, then the content tokens
            x = torch.cat([x[:, :1].expand(-1, num_devices, -1), x[:, 1:]], dim=1)
            positions = torch.cat([positions.new_zeros(num_devices), positions[1:]])
            if attention_mask is not None:
                pad = attention_mask[:, :1].expand(-1, num_devices)
                attention_mask = torch.cat([pad, attention_mask[:, 1:]], dim=1)
        mask = base_mask(self.model, positions, attention_mask)
        self.slot.layout = None
        if num_devices > 1:
            self.slot.layout = self._layout(num_tokens, placement, replicate, x.device)
            self.slot.layout.loss = [loss] if isinstance(loss, PacketChannel) else loss
            self.slot.layout.item_bits = self.config.bits_per_token_per_block()
        try:
            for block in self.model.blocks:
                x = block(x, positions, mask)
        finally:
            self.slot.layout = None
        if replicate:
            # mean of the replicas, before the final norm (the head normalises it as usual)
            x = torch.cat([x[:, :num_devices].mean(dim=1, keepdim=True), x[:, num_devices:]], 1)
        return x

    def _layout(
        self, num_tokens: int, placement: PlacementConfig, replicate: bool, device
    ) -> DeviceLayout:
        prefix = 1 if self.class_tokens != "none" else 0
        content = assign_tokens(num_tokens - prefix, placement)
        if replicate:
            replicas = torch.arange(placement.num_devices)
            dev = torch.cat([replicas, content])
            sendable = torch.cat(
                [
                    torch.zeros_like(replicas, dtype=torch.bool),
                    torch.ones_like(content, dtype=torch.bool),
                ]
            )
        else:
            # single class token (ablation): on device 0, quantized and sent like any token
            dev = torch.cat([content.new_zeros(prefix), content])
            sendable = torch.ones_like(dev, dtype=torch.bool)
        return DeviceLayout(dev.to(device), sendable.to(device))

    @torch.no_grad()
    def record_quant_inputs(self, run) -> list[list[Tensor]]:
        """Run `run()` (a full-precision forward) and return, per block, the tensors each of its
        codebooks quantizes, as [(N, width), ...]: the calibration data for K-means and NAQ."""
        self.slot.recording = [[] for _ in self.model.blocks]
        try:
            run()
            recorded = self.slot.recording
        finally:
            self.slot.recording = None
        out = []
        for per_call in recorded:
            num_parts = len(per_call[0])
            out.append(
                [torch.cat([c[i].flatten(0, -2) for c in per_call]) for i in range(num_parts)]
            )
        return out


def effective_class_tokens(model: nn.Module, requested: str) -> str:
    """Only encoders with a class token use one; decoders and models without one get "none"."""
    if getattr(model, "num_prefix_tokens", 0) == 0 or getattr(model, "causal", False):
        return "none"
    return requested


def apply_astra(model: nn.Module, config: AstraConfig) -> AstraModel:
    """Wrap every block's attention in place; the base model's own forward stays exact."""
    return AstraModel(model, config)


def base_mask(model: nn.Module, positions: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """The model's own mask: causal for decoders, key padding for padded encoders."""
    mask = (
        causal_mask(positions, positions)[None, None] if getattr(model, "causal", False) else None
    )
    if attention_mask is not None:
        pad = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        mask = pad if mask is None else mask & pad
    return mask
