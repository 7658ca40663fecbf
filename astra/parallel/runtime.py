"""Sequence-parallel attention on one rank: exact local K/V, remote K/V rebuilt from the wire.

Each rank holds the whole model and its share of the tokens (paper §3.1). Per block:

1. encode the attention input of the tokens it shares and *start* the all-gather;
2. while the payload is on the link, project its local q/k/v and attend to its local keys
   (exact; the partial result keeps its log-sum-exp);
3. wait, rebuild the remote keys/values from the payloads, attend to them, and merge the two
   partial softmaxes exactly with their log-sum-exps (the merge is what lets step 2 overlap
   the link: the paper's runtime waits serially);
4. the MLP is position-wise and runs locally with no communication.

How the payloads travel (`exchange`):

- "all-gather" (encoders, and decoders on request): one collective per block; every rank
  waits for every other, so each block costs at least one link latency on every rank.
- "stream" (the default for causal prefill): a rank sends its codes point-to-point only to the
  ranks that hold later tokens, and receives only from the ranks that hold earlier ones. With
  contiguous placement rank 0 never waits and runs ahead; rank r starts block l as soon as the
  earlier ranks' block-l codes arrive, and those left while it was still busy with block l-1.
  The latency is paid once per rank boundary, (N-1) x latency in all, instead of once per
  block (paper §4 charges every block's exchange in full: 30 x 20 ms = 600 ms for SmolLM2).
  The last rank never sends at all: no one attends to its tokens during prefill, and decoding
  continues on it (paper §3.1 step 4).

The same code runs over a real communicator (astra.net) or the lockstep one used by the
composed mode (astra.parallel.lockstep); with `CodesCodec` it is ASTRA, with `FloatCodec` it is
full-precision sequence parallelism (Voltage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astra.models.attention import (
    Attention,
    KVCache,
    causal_mask,
    seen_within_window,
    softcapped_attention_lse,
)
from astra.parallel.codecs import CodesCodec

if TYPE_CHECKING:
    from astra.net.protocol import Comm


@dataclass
class RankLayout:
    """What rank `rank` holds and what every rank sends; identical on all ranks."""

    rank: int
    world_size: int
    local_index: Tensor  # (T_local,) indices into the (class-token-expanded) sequence
    local_positions: Tensor  # (T_local,) absolute positions
    send_local: Tensor  # (S,) indices into the local tokens that are sent (class replicas aren't)
    send_counts: list[int]  # tokens each rank sends, per rank
    send_positions: list[Tensor]  # absolute positions of the tokens each rank sends, per rank
    causal: bool
    last_positions: list[int]  # latest position each rank holds (-1: none)
    held_positions: list[Tensor] | None = None  # (T_j,) positions each rank holds, sorted

    @property
    def remote_positions(self) -> Tensor:
        parts = [p for j, p in enumerate(self.send_positions) if j != self.rank]
        return torch.cat(parts) if parts else self.local_positions.new_zeros(0)

    def sees(self, receiver: int, sender: int, window: int | None = None) -> bool:
        """Whether some query on `receiver` may attend to a token that `sender` sends; with a
        sliding `window`, only keys at most window-1 positions older count."""
        if receiver == sender or self.send_counts[sender] == 0:
            return False
        if not self.causal:
            return True
        sent = self.send_positions[sender]
        if window is None or self.held_positions is None:
            return int(sent.min()) <= self.last_positions[receiver]
        queries = self.held_positions[receiver]  # sorted
        keys = sent.sort().values
        # for each query, the latest key at or before it: visible if inside the window
        latest = torch.searchsorted(keys, queries, right=True) - 1  # (T_receiver,)
        ok = latest >= 0
        return bool((queries[ok] - keys[latest[ok]] < window).any())

    def for_window(self, window: int | None) -> RankLayout:
        """This layout for a sliding-window layer: each rank sends only the tokens some other
        rank's window reaches (with contiguous placement, its last window-1 tokens), so the
        codes of the rest never travel. Every rank derives the same from the same positions."""
        if window is None or not self.causal or self.held_positions is None:
            return self
        keep = []
        for j in range(self.world_size):
            others = [p for r, p in enumerate(self.held_positions) if r != j]
            queries = torch.cat(others) if others else self.send_positions[j][:0]
            keep.append(seen_within_window(self.send_positions[j], queries, window))
        return replace(
            self,
            send_local=self.send_local[keep[self.rank]],
            send_counts=[int(k.sum()) for k in keep],
            send_positions=[p[k] for p, k in zip(self.send_positions, keep, strict=True)],
        )

    def senders_within(self, window: int | None = None) -> list[int]:
        """Ranks whose codes this rank needs (causal: only ranks holding earlier tokens, and
        with a sliding window only those whose tokens some window here reaches)."""
        return [j for j in range(self.world_size) if self.sees(self.rank, j, window)]

    def consumers_within(self, window: int | None = None) -> list[int]:
        """Ranks that need this rank's codes (the mirror of senders_within)."""
        return [j for j in range(self.world_size) if self.sees(j, self.rank, window)]

    @property
    def senders(self) -> list[int]:
        return self.senders_within(None)

    @property
    def consumers(self) -> list[int]:
        return self.consumers_within(None)


class RankAttention(nn.Module):
    """The per-rank replacement of a block's attention (same call signature as Attention)."""

    def __init__(
        self,
        inner: Attention,
        codec,
        layout: RankLayout,
        comm: Comm,
        overlap: bool = True,
        block: int = 0,
        loss=None,
        exchange: str = "auto",
    ):
        super().__init__()
        self.exchange = resolve_exchange(exchange, layout.causal)
        # a sliding-window layer sends only the tokens other ranks' windows reach, only to the
        # ranks they reach, and needs codes only from ranks its windows reach
        self.window = inner.window
        layout = layout.for_window(self.window)
        self.senders = layout.senders_within(self.window)
        self.consumers = layout.consumers_within(self.window)
        # streaming: the last rank's codes are needed by no one during prefill
        self.sends = self.exchange == "all-gather" or bool(self.consumers)
        self.inner = inner
        self.block = block  # index of this block: keys the loss decisions
        # PacketChannel: a lossy link, codes travel in packets and lost ones are not resent
        self.loss = loss
        self.lost_tokens = 0
        self.codec = codec
        self.layout = layout
        self.comm = comm
        self.overlap = overlap
        # remote keys that depend on their codes alone (no RoPE) and a mask that does not
        # depend on positions: attend to each distinct code once (attend_counted_keys). That
        # is every encoder, and a causal model without RoPE (GPT-2) on a rank whose senders
        # all hold earlier tokens (streamed, contiguous): every remote key is then visible
        self.count_duplicates = (
            isinstance(codec, CodesCodec)
            and overlap
            and inner.rope is None
            and self.window is None
            and inner.softcap is None
            and (not layout.causal or _all_remote_keys_earlier(layout, self.senders))
        )
        self.distinct_codes = 0  # distinct remote codes attended, summed over passes
        self.remote_tokens = 0  # remote tokens they stand for
        self.capture: dict | None = None  # set on the decode device before the last prefill
        self.timings: dict[str, float] | None = None  # ms per stage, when profiling
        self._last = 0.0

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache=None):
        if mask is not None and self.count_duplicates:
            # merged remote keys stand for many positions: a per-token mask cannot apply
            raise ValueError("RankAttention merges duplicate remote codes and takes no mask")
        lay, attn = self.layout, self.inner
        lap = self._lap
        lap(None)
        # the tokens this device shares: all of them (a view, no copy) unless it holds
        # class-token replicas, which are never sent
        every = lay.send_local.numel() == lay.local_index.numel()
        send = slice(None) if every else lay.send_local
        if getattr(self.codec, "needs_kv", False):
            q, k, v = attn.project(x)  # (1,H,T,hd), (1,Hkv,T,hd) x2, before RoPE
            lap("project")
            # 1. what leaves this device: codes of the shared tokens' k and v
            payload = None
            if self.sends:
                payload = self._encode(attn, x[:, send], (k[:, :, send], v[:, :, send]))
            handle = self._start_exchange(payload)
            lap("encode")
        else:
            # 1. what leaves this device, first, so the link starts as early as possible
            payload = self._encode(attn, x[:, send]) if self.sends else None
            handle = self._start_exchange(payload)
            lap("encode")
            q, k, v = attn.project(x)
            lap("project")
        # 2. local, exact, overlapping the link
        q, k = attn.rotate(q, positions), attn.rotate(k, positions)
        if self.overlap:
            out_local, lse_local = attend_positions(
                q, k, v, positions, positions, lay.causal, attn.window, attn.softcap
            )
        lap("local_attention")
        # 3. remote, rebuilt from what arrived
        senders = self.senders
        if self.overlap and handle is None and not senders and self.capture is None:
            # the first device of a streamed prefill: nothing arrives, local attention is all
            b, h, n, hd = out_local.shape
            y = attn.o_proj(out_local.transpose(1, 2).reshape(b, n, h * hd))  # (1, T, D)
            lap("remote_attention")
            return y
        payloads = self._finish_exchange(handle, senders)
        lap("wait")
        if self.capture is not None:  # the decode device keeps what decoding needs (App. G)
            self.capture.update(k=k, v=v, payloads=payloads)
        if self.count_duplicates:
            out_remote, lse_remote = self._attend_distinct(q, payloads, senders, lap)
            return self._merge_and_project(out_local, lse_local, out_remote, lse_remote, lap)
        k_hat, v_hat, remote_pos = self._rebuild_remote(payloads, senders)
        k_hat = attn.rotate(k_hat, remote_pos)
        lap("rebuild_remote")
        if not self.overlap:
            mask_all = None  # the paper's serial runtime: one dense masked attention
            if lay.causal:
                mask_all = causal_mask(positions, torch.cat([positions, remote_pos]), attn.window)
            y = attn.attend(q, torch.cat([k, k_hat], 2), torch.cat([v, v_hat], 2), mask_all)
            lap("remote_attention")
            return y
        out_remote, lse_remote = attend_positions(
            q, k_hat, v_hat, positions, remote_pos, lay.causal, attn.window, attn.softcap
        )
        return self._merge_and_project(out_local, lse_local, out_remote, lse_remote, lap)

    def _merge_and_project(self, out_local, lse_local, out_remote, lse_remote, lap) -> Tensor:
        """The two partial softmaxes (1,H,T,hd) with their lse (1,H,T) -> o_proj'd (1,T,D)."""
        merged = merge_partials(out_local, lse_local, out_remote, lse_remote)  # (1,H,T,hd)
        b, h, n, hd = merged.shape
        y = self.inner.o_proj(merged.transpose(1, 2).reshape(b, n, h * hd))  # (1, T, D)
        lap("remote_attention")
        return y

    def _attend_distinct(
        self, q: Tensor, payloads, senders: list[int], lap
    ) -> tuple[Tensor, Tensor]:
        """Remote attention through each distinct code once: the rebuild and the attention
        cost what the distinct codes do, not the remote tokens (CodesCodec.distinct).
        q (1,H,T,hd) -> out (1,H,T,hd), lse (1,H,T) float32."""
        joined, _ = self.joined_remote(payloads, senders)
        if joined is None:
            lap("rebuild_remote")
            return _no_keys(q)
        unique, counts = self.codec.distinct(joined)  # (1, U, G), (U,)
        self.distinct_codes += unique.shape[1]
        self.remote_tokens += joined.shape[1]
        k_hat, v_hat = self.codec.rebuild_kv(self.inner, unique)  # (1, Hkv, U, hd) each
        lap("rebuild_remote")
        return attend_counted_keys(q, k_hat, v_hat, counts)

    def _lap(self, stage: str | None) -> None:
        """Charge the time since the last lap to `stage` (when timings are on)."""
        if self.timings is None:
            return
        now = self.comm.now()
        if stage is not None:
            self.timings[stage] = self.timings.get(stage, 0.0) + (now - self._last) * 1e3
        self._last = now

    def _start_exchange(self, payload: Tensor | None):
        if self.exchange == "all-gather":
            return self.comm.start_all_gather_bytes(payload)
        for j in self.consumers:  # queued, never blocks: the rank runs on
            self.comm.send_tensor(payload, j)
        return None

    def _finish_exchange(self, handle, senders: list[int]) -> list[Tensor | None]:
        """Payloads by rank (None where nothing was received)."""
        if handle is not None:
            return handle.wait()
        payloads: list[Tensor | None] = [None] * self.layout.world_size
        for j in senders:
            payloads[j] = self.comm.recv_tensor(j)
        return payloads

    def _encode(self, attn: Attention, x: Tensor, kv=None) -> Tensor:
        """What leaves this device: the codec's payload or, on a lossy link, the codes cut
        into MTU-sized packets (astra.net.packets)."""
        if self.loss is not None and isinstance(self.codec, CodesCodec):
            codes = self.codec.encode_codes(attn, x, kv)  # (n, G_wire)
            return self.loss.send(codes, self.codec.bits, self.block, self.layout.rank)
        return self.codec.encode(attn, x, kv)

    def _receive(self, payload: Tensor, sender: int) -> tuple[Tensor, Tensor | None]:
        """(what arrived from `sender` (1, n, .), kept (n,) bool or None when nothing is lost).
        On a lossy link the packets the network drops are dropped here, and only what arrived
        (or was rebuilt from parity) is decoded."""
        count = self.layout.send_counts[sender]
        if self.loss is None:
            return self.codec.receive(payload, count), None
        rank = self.layout.rank
        if isinstance(self.codec, CodesCodec):
            c = self.codec
            codes, kept = self.loss.receive(
                payload, count, c.groups, c.bits, self.block, sender, rank
            )
            return codes[None], kept  # (n, G) -> (1, n, G)
        item_bits = payload.numel() * 8 // max(count, 1)  # floats: a token spans packets
        kept = self.loss.kept_tokens(count, item_bits, self.block, sender, rank)
        return self.codec.receive(payload, count), kept

    def joined_remote(
        self, payloads: list[Tensor | None], senders: list[int], count_lost: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """What arrived from `senders`, joined: (codes or SP's hidden states (1, T_remote, .),
        or None when nothing came; their positions (T_remote,)). Lost codes are dropped (those
        tokens are simply not attended to) and, with `count_lost`, counted once per pass."""
        received, pos = [], []
        for j in senders:
            got, keep = self._receive(payloads[j], j)  # (1, n, .), (n,)
            p = self.layout.send_positions[j]
            if keep is not None:
                if count_lost:
                    self.lost_tokens += int((~keep).sum())
                got, p = got[:, keep], p[keep]
            received.append(got)
            pos.append(p)
        positions = _cat_positions(pos, self.layout.local_positions)
        if not received:
            return None, positions
        return (received[0] if len(received) == 1 else torch.cat(received, dim=1)), positions

    def _rebuild_remote(self, payloads: list[Tensor], senders: list[int]):
        """Remote (k, v) (1, Hkv, T_remote, hd) before RoPE and their positions (T_remote,),
        rebuilt in one call for every sender: one lookup (or one projection) for all."""
        joined, positions = self.joined_remote(payloads, senders)
        if joined is None:
            attn = self.inner
            empty = torch.zeros(1, attn.num_kv_heads, 0, attn.head_dim, dtype=attn.dtype)
            return empty, empty.clone(), positions
        k, v = self.codec.rebuild_kv(self.inner, joined)
        return k, v, positions


def _all_remote_keys_earlier(layout: RankLayout, senders: list[int]) -> bool:
    """Every token `senders` send precedes every token this rank holds (no causal mask)."""
    first_local = int(layout.local_positions.min()) if layout.local_positions.numel() else 0
    sent = [layout.send_positions[j] for j in senders if layout.send_positions[j].numel()]
    return all(int(p.max()) < first_local for p in sent)


def distinct_code_share(model: nn.Module) -> float | None:
    """Distinct remote codes attended over the remote tokens they stood for, over every block
    whose attention merges duplicates (None where none does: RoPE models): what the remote
    attention cost relative to attending every token."""
    counted = [b.attn for b in model.blocks if getattr(b.attn, "count_duplicates", False)]
    tokens = sum(a.remote_tokens for a in counted)
    return round(sum(a.distinct_codes for a in counted) / tokens, 4) if tokens else None


REMOTE_CACHES = ("codes", "rebuilt")


class DecodeAttention(nn.Module):
    """Attention on the decode device after a distributed prefill (paper §3.1 step 4, App. G).

    Local keys/values stay exact and grow with each generated token. The other devices' keys
    and values are kept as the payloads that arrived during prefill (`remote_cache="codes"`,
    the paper's choice: G*log2K bits per remote token instead of 2*Dkv floats) and rebuilt at
    every step; for the "kv" point that is a table lookup plus RoPE, in every block, for every
    remote token, at every step. `remote_cache="rebuilt"` rebuilds them once, rotated, and
    keeps the floats: the same outputs (the rebuild is deterministic) for the memory of a
    full-precision cache and none of the per-step work.
    """

    def __init__(self, rank_attention: RankAttention, captured: dict, remote_cache: str = "codes"):
        super().__init__()
        if remote_cache not in REMOTE_CACHES:
            raise ValueError(f"remote_cache {remote_cache!r} is not one of {REMOTE_CACHES}")
        self.inner = rank_attention.inner
        self.codec = rank_attention.codec
        self.layout = rank_attention.layout
        self.cache = KVCache()  # preallocated: a step appends in place (no copy of the cache)
        k_local, v_local = captured["k"], captured["v"]  # (1, Hkv, T_local, hd), k rotated
        lay = self.layout
        # every rank's tokens precede the last one, so the decode device has received them all
        self.senders = [
            j for j in rank_attention.senders if captured["payloads"][j] is not None
        ]
        # what is kept per remote token: its codes (unpacked once, every sender's in one
        # tensor, so one rebuild per step), not its keys and values; what was lost in the
        # prefill stays lost (and was counted there)
        self.remote, self.remote_positions = rank_attention.joined_remote(
            captured["payloads"], self.senders, count_lost=False
        )  # (1, T_remote, G_wire) or None
        self.rebuilt_tokens = 0  # remote tokens rebuilt once, at the front of the cache
        if remote_cache == "rebuilt" and self.remote is not None:
            k_hat, v_hat = self._rebuild()
            # one cache in position order, as on a single device: (1, Hkv, T_remote + T_local, hd)
            self.cache.update(k_hat, v_hat)
            self.rebuilt_tokens, self.remote = k_hat.shape[2], None
        self.cache.update(k_local, v_local)
        # a sliding-window layer masks by position: every cached key's, in cache order
        self.key_positions: Tensor | None = None
        if self.inner.window is not None:
            front = self.remote_positions if self.rebuilt_tokens else self.remote_positions[:0]
            self.key_positions = torch.cat([front, lay.local_positions])

    def _rebuild(self) -> tuple[Tensor, Tensor]:
        """The remote (k rotated, v) (1, Hkv, T_remote, hd) from the kept codes (non-empty)."""
        k, v = self.codec.rebuild_kv(self.inner, self.remote)
        return self.inner.rotate(k, self.remote_positions), v

    def cache_bytes(self) -> dict:
        k = self.cache.k
        per_token = 2 * k.shape[1] * k.shape[3] * k.element_size()  # k and v
        rebuilt = self.rebuilt_tokens * per_token
        local = self.cache.length * per_token - rebuilt
        r = self.remote
        remote_bits = (
            0 if r is None else r.numel() * getattr(self.codec, "bits", r.element_size() * 8)
        )
        return {
            "local_exact_bytes": local,
            "remote_code_bytes": remote_bits // 8,
            "remote_rebuilt_bytes": rebuilt,
        }

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache=None):
        attn = self.inner
        q, k, v = attn.project(x)  # (1, H, 1, hd), (1, Hkv, 1, hd)
        q, k = attn.rotate(q, positions), attn.rotate(k, positions)
        k_all, v_all = self.cache.update(k, v)  # in place, no copy of the cache
        mask = None  # every cached token precedes the new one
        if self.key_positions is not None:  # ... but a sliding window sees only the latest
            self.key_positions = torch.cat([self.key_positions, positions.reshape(-1)])
            key_positions = self.key_positions
            if self.remote is not None:
                key_positions = torch.cat([self.remote_positions, key_positions])
            mask = causal_mask(positions.reshape(-1), key_positions, attn.window)  # (1, Tk)
        if self.remote is not None:  # codes kept: rebuild every step
            k_hat, v_hat = self._rebuild()
            k_all = torch.cat([k_hat, k_all], dim=2)
            v_all = torch.cat([v_hat, v_all], dim=2)
        return attn.attend(q, k_all, v_all, mask)


class CausalKernelAttention(nn.Module):
    """Single-device causal prefill with the striped causal kernel (`_attend_causal_square`)
    instead of a dense boolean mask: the same maths as `Attention.forward` with `causal_mask`,
    skipping the masked half. The single-device baseline uses it so that ASTRA is compared with
    the fastest exact kernel, the one ASTRA's devices use for their own tokens."""

    def __init__(self, inner: Attention):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor | None = None, cache=None):
        attn = self.inner
        if attn.window is not None or attn.softcap is not None:  # no such kernel: the mask
            return attn(x, positions, causal_mask(positions, positions), cache)
        q, k, v = attn.project(x)
        q, k = attn.rotate(q, positions), attn.rotate(k, positions)
        if cache is not None:
            if cache.length:
                raise ValueError("the causal kernel path is for a prefill from an empty cache")
            k, v = cache.update(k, v)
        y = _attend_causal_square(q, k, v)[0]  # (B, H, T, hd): the striped kernel, as ASTRA's
        b, h, n, hd = y.shape
        return attn.o_proj(y.transpose(1, 2).reshape(b, n, h * hd))


def use_causal_kernel_(model: nn.Module) -> None:
    """Swap every block's attention for CausalKernelAttention (decoders only)."""
    for block in model.blocks:
        if not isinstance(block.attn, CausalKernelAttention):
            block.attn = CausalKernelAttention(block.attn)


def restore_attention_(model: nn.Module) -> None:
    for block in model.blocks:
        if isinstance(block.attn, CausalKernelAttention):
            block.attn = block.attn.inner


EXCHANGES = ("auto", "all-gather", "stream")


def resolve_exchange(exchange: str, causal: bool) -> str:
    """The exchange to use: "auto" streams causal prefills and all-gathers the rest."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange {exchange!r} is not one of {EXCHANGES}")
    if exchange == "auto":
        return "stream" if causal else "all-gather"
    if exchange == "stream" and not causal:
        raise ValueError(
            "exchange 'stream' is for causal models (every encoder token needs every other "
            "rank's codes in every block); use 'all-gather' or 'auto'"
        )
    return exchange


def position_runs(positions: Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions: [(start, stop, first_pos, last_pos)] by index."""
    if positions.numel() == 0:
        return []
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    bounds = [0, *breaks.tolist(), positions.numel()]
    pos = positions.tolist()
    return [(a, b, pos[a], pos[b - 1]) for a, b in zip(bounds[:-1], bounds[1:])]


def attend_positions(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    causal: bool,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention (with log-sum-exp) of queries at q_pos to keys at k_pos.

    Causal: split both sides into runs of consecutive positions; key runs wholly after a query
    run are skipped, wholly before it attended without a mask, the same run attended causally
    (`_attend_causal_square`: (k+1)/2k of the dense work in k stripes), and only interleaved
    runs need an explicit mask. This is what lets a device holding the latest tokens, or
    zigzag chunks, do its share of the causal attention instead of a dense masked square. A
    sliding `window` also skips key runs wholly older than every query's window; `softcap`:
    Gemma 2's capped scores (astra.models.attention.softcapped_attention_lse).
    """
    if not causal:
        return _attend_lse(q, k, v, None, softcap=softcap)
    pieces, pieces_lse = [], []
    k_runs = position_runs(k_pos)
    for qa, qb, q_first, q_last in position_runs(q_pos):
        qq = q[:, :, qa:qb]
        out = lse = None
        for ka, kb, k_first, k_last in k_runs:
            if k_first > q_last:
                continue  # entirely in this run's future
            if window is not None and q_first - k_last >= window:
                continue  # entirely older than every query's window
            kk, vv = k[:, :, ka:kb], v[:, :, ka:kb]
            inside = window is None or q_last - k_first < window  # no key leaves a window
            if k_last < q_first and inside:
                part = _attend_lse(qq, kk, vv, None, softcap=softcap)
            elif (k_first, k_last) == (q_first, q_last) and inside and softcap is None:
                part = _attend_causal_square(qq, kk, vv)
            else:
                part = _attend_lse(
                    qq, kk, vv, causal_mask(q_pos[qa:qb], k_pos[ka:kb], window), softcap=softcap
                )
            out, lse = part if out is None else _merge_with_lse(out, lse, *part)
        if out is None:  # no visible key at all
            out, lse = _no_keys(qq)
        pieces.append(out)
        pieces_lse.append(lse)
    if not pieces:
        return _no_keys(q)
    if len(pieces) == 1:
        return pieces[0], pieces_lse[0]
    return torch.cat(pieces, dim=2), torch.cat(pieces_lse, dim=2)


# Query rows per piece of a causal square. The CPU flash kernel skips the masked half of a
# causal square only coarsely (SmolLM2's 9 heads at 1024 rows: 62 ms causal against 74 ms
# dense, where half the dense work would be 37 ms), so a causal square is cut into 128-row
# stripes, each attending densely to the stripes before it (grouped-query heads stacked, no
# mask) and causally to itself. Medians of 15 interleaved calls on the AVX2 machine, one
# thread: 1024 rows 54.3 ms against 61.8 unstriped and 55.4 with 256-row stripes; 512 rows
# 17.6 against 23.2 and 18.2. Below 2 stripes the kernel is called as is.
CAUSAL_STRIPE = 128


def _attend_causal_square(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention of q (B,H,T,hd) to k/v (B,Hkv,T,hd) at the same positions, with lse."""
    n = q.shape[2]
    if n < 2 * CAUSAL_STRIPE:
        return _attend_lse(q, k, v, None, is_causal=True)
    outs, lses = [], []
    for a in range(0, n, CAUSAL_STRIPE):
        b = min(a + CAUSAL_STRIPE, n)
        qq = q[:, :, a:b]
        out, lse = _attend_lse(qq, k[:, :, a:b], v[:, :, a:b], None, is_causal=True)
        if a > 0:  # the stripes before this one are wholly in its past: no mask
            out, lse = _merge_with_lse(out, lse, *_attend_lse(qq, k[:, :, :a], v[:, :, :a], None))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _cat_positions(parts: list[Tensor], like: Tensor) -> Tensor:
    return torch.cat(parts) if parts else like.new_zeros(0)


def _no_keys(q: Tensor) -> tuple[Tensor, Tensor]:
    """The partial of queries that see no key: out 0 (B,H,Tq,hd), lse -inf (B,H,Tq) float32,
    which drops out of every merge."""
    return q.new_zeros(q.shape), q.new_full(q.shape[:3], -math.inf, dtype=torch.float32)


def attend_counted_keys(q: Tensor, k: Tensor, v: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Unmasked attention to keys that each stand for counts[j] identical tokens: exactly the
    (out, lse) of attending to every token, for the work of the distinct keys.

    q (B,H,Tq,hd), k/v (B,Hkv,U,hd), counts (U,) -> out (B,H,Tq,hd), lse (B,H,Tq) float32.
    sum_tokens exp(s_t) v_t = sum_keys counts_j exp(s_j) v_j = sum_keys exp(s_j + log counts_j)
    v_j, so each key's score is raised by log(counts_j) (_attend_lse's key_bias)."""
    return _attend_lse(q, k, v, None, key_bias=counts.log())


def _attend_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool = False,
    softcap: float | None = None,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns the log-sum-exp of each query's scores.

    q (B,H,Tq,hd), k/v (B,Hkv,Tk,hd), mask bool (Tq,Tk) or None -> out (B,H,Tq,hd), lse (B,H,Tq).
    Rows with no visible key get lse = -inf and out = 0, so they drop out of the merge.
    `key_bias` (Tk,) float32 is added to every query's score of each key (attend_counted_keys);
    it stays float32 even for bf16 queries (the CPU flash kernel takes it), so it is not rounded.
    """
    b, h, tq, hd = q.shape
    if k.shape[2] == 0 or tq == 0:  # (the CPU flash kernel dies on zero query rows)
        return _no_keys(q)
    if softcap is not None:  # no fused kernel caps scores
        if key_bias is not None:
            raise ValueError("softcapped attention takes no key_bias")
        if is_causal:
            mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril()
        return softcapped_attention_lse(q, k, v, mask, softcap)
    hkv = k.shape[1]
    if hkv != h and mask is None and not is_causal and q.device.type == "cpu":
        # grouped-query attention without a mask: the h/Hkv query heads of one kv head are
        # stacked as rows of one head (q (B,H,Tq,hd) -> (B,Hkv,G*Tq,hd)), so the kernel reads
        # each kv head once instead of a repeated copy: bit-identical, ~10 % faster here
        stacked = q.reshape(b, hkv, h // hkv * tq, hd)  # the bias is per key: it still applies
        out, lse = _attend_lse(stacked, k, v, None, key_bias=key_bias)
        return out.reshape(b, h, tq, hd), lse.reshape(b, h, tq)
    if hkv != h:  # grouped-query attention: share each kv head across h/Hkv query heads
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        if key_bias is not None:  # one row shared by every query: a stride-0 expand, no copy
            bias = key_bias.view(1, 1, 1, -1)  # (1, 1, 1, Tk)
            additive = bias.expand(1, 1, q.shape[2], bias.shape[-1]) if additive is None else (
                additive + bias
            )
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=additive
        )
    else:  # scores and lse in float32 whatever the model's dtype (the merges read lse)
        scores = (q.float() @ k.float().transpose(-1, -2)) * hd**-0.5  # (B,H,Tq,Tk)
        if is_causal:
            mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if key_bias is not None:
            scores = scores + key_bias
        lse = torch.logsumexp(scores, dim=-1)
        out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    if mask is not None:
        # rows with no visible key: the CPU flash kernel reports lse = 0 there, not -inf
        dead = ~mask.any(dim=-1)  # (Tq,)
        if dead.any():
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Exact softmax over the union of two key sets from their partial results (B,H,T,hd)."""
    return _merge_with_lse(out_a, lse_a, out_b, lse_b)[0]


def _merge_with_lse(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """merge_partials plus the union's log-sum-exp (B,H,T), for merging more pieces later."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe)[..., None]  # lse is float32 whatever the model's dtype
    w_b = torch.exp(lse_b - safe)[..., None]
    return torch.addcmul(w_a * out_a, w_b, out_b).to(out_a.dtype), lse


def plain_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Reference used in tests: SDPA with GQA repeat, mask True = may attend."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
