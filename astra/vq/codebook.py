"""Grouped vector-quantization codebook: what crosses the wire in ASTRA.

ASTRA §3.2 (VQ module): every block owns one codebook shared by all devices. A token x (D,) is
split into G equal sub-vectors (grouped VQ, after HiFi-Codec); each sub-vector is replaced by the
index of its nearest code, so a token costs G * ceil(log2 K) bits instead of D * 32.

Training follows the paper: K-means initialisation from the model's own activations, EMA codebook
updates (no codebook loss term), the commitment loss of Eq. 2 and a straight-through estimator.
All distance and EMA maths runs in float32 whatever the input dtype (vector-quantize-pytorch
disables autocast for the same reason: half-precision ||x||^2 - 2 x e^T cancels badly), with one
exception: bfloat16 inputs (or `encode(x, "bfloat16")`) take the dot products x e^T in bf16
and only the comparison in float32 (`_nearest_bf16`), in inference and training alike, so the
simulation of a bf16 model picks the codes its runtime sends. `encode(x, "pca")` runs a first
pass in a third of the dimensions (`_nearest_pca`); both re-rank their best candidates exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CodebookConfig", "GroupedCodebook", "table_sum"]

# Floats in one (G, m, K) distance block: 2^22 * 4 B = 16 MiB, so encoding 100k tokens with
# K=1024 never materialises the full (G, N, K) distance matrix.
_DIST_CHUNK_ELEMENTS = 1 << 22
# how a sender finds each row's nearest code (GroupedCodebook.encode)
SEARCH_KINDS = ("float32", "bfloat16", "pca")
# the "pca" first pass needs room: below this group width the exact search costs as little
MIN_PCA_DIM = 48
# k-means++ seeding is sequential in K; it runs on a random pool of at most this many points per
# code, then Lloyd iterations on all samples refine the centres.
_SEED_POOL_PER_CODE = 4
# kmeans_init_'s seeding draws the K centres in this many rounds, ceil(K/32) per round from one
# D^2 distribution (k-means|| style): 32 sequential passes over the pool instead of K, each a
# real matmul against the round's new centres (K <= 32: one per round, plain k-means++). On
# SmolLM2's kv activations (G=32, K=1024) the error after Lloyd is that of one-at-a-time seeding.
_SEED_ROUNDS = 32
# Floats in one distance block of the calibration searches (1 MiB): it stays in a core's L2.
_BLOCK_ELEMENTS = 1 << 18
# Prefix sizes (centres that moved most) that the pruned Lloyd assignment tries before all K.
_PRUNE_TIERS = (16, 64, 256)


def _divisor_hint(dim: int, num_groups: int) -> str:
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    below = [d for d in divisors if d < num_groups]
    above = [d for d in divisors if d > num_groups]
    nearest = ([below[-1]] if below else []) + ([above[0]] if above else [])
    shown = ", ".join(map(str, divisors)) if len(divisors) <= 24 else "..."
    return f"nearest valid: {', '.join(map(str, nearest))} (all divisors of {dim}: {shown})"


@dataclass(frozen=True)
class CodebookConfig:
    dim: int  # D: width of the vectors being quantized
    num_groups: int = 1  # G: sub-vectors per token, each with its own codebook (must divide D)
    codebook_size: int = 1024  # K: codes per group; paper uses 1024 = 10 bits
    ema_decay: float = 0.99  # EMA decay of cluster sizes / sums (not given in the paper)
    eps: float = 1e-5  # Laplace smoothing of cluster sizes, avoids division by zero
    # EMA cluster size (tokens per update) below which a code is restarted from a random input of
    # the current batch. 1e-2 only revives codes that got no token for ~460 updates at decay 0.99
    # (0.99^460 ~ 0.01), so rare-but-used codes are left alone; 0 disables restarts.
    dead_code_threshold: float = 1e-2
    # beta of Eq. 2; tiny because VQ sits in every block (§3.2: 1e-4..5e-4, 0.25 hurts).
    commitment_weight: float = 2e-4

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got dim={self.dim}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got num_groups={self.num_groups}")
        if self.dim % self.num_groups != 0:
            raise ValueError(
                f"num_groups={self.num_groups} must divide dim={self.dim} "
                f"(remainder {self.dim % self.num_groups}); "
                f"{_divisor_hint(self.dim, self.num_groups)}"
            )
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got codebook_size={self.codebook_size}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got ema_decay={self.ema_decay}")
        if not self.eps > 0.0:
            raise ValueError(f"eps must be > 0, got eps={self.eps}")
        if not self.dead_code_threshold >= 0.0:
            raise ValueError(
                f"dead_code_threshold must be >= 0, got dead_code_threshold="
                f"{self.dead_code_threshold}"
            )
        if not self.commitment_weight >= 0.0:
            raise ValueError(
                f"commitment_weight must be >= 0, got commitment_weight={self.commitment_weight}"
            )

    @property
    def group_dim(self) -> int:
        return self.dim // self.num_groups

    @property
    def bits_per_code(self) -> int:
        # ceil(log2 K) in exact integer arithmetic (float log2 misrounds near powers of two)
        return (self.codebook_size - 1).bit_length()

    @property
    def bits_per_token(self) -> int:
        return self.num_groups * self.bits_per_code


def _nearest(x: Tensor, embed: Tensor) -> tuple[Tensor, Tensor]:
    """x (G, M, Dg), embed (G, K, Dg), both float32 -> codes (G, M) int64, sq_dist (G, M).

    ||x - e||^2 = ||x||^2 - 2 x e^T + ||e||^2; ||x||^2 is constant per row, so the argmin only
    needs ||e||^2 - 2 x e^T (one batched matmul). Chunked over M to bound memory.
    """
    num_groups, num_tokens, _ = x.shape
    size = embed.shape[1]
    e_sq = embed.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
    e_t = embed.transpose(1, 2)  # (G, Dg, K)
    step = max(1, _DIST_CHUNK_ELEMENTS // (num_groups * size))
    codes = torch.empty(num_groups, num_tokens, dtype=torch.long, device=x.device)
    dists = torch.empty(num_groups, num_tokens, dtype=x.dtype, device=x.device)
    for start in range(0, num_tokens, step):
        xc = x[:, start : start + step]  # (G, m, Dg)
        partial = torch.baddbmm(e_sq, xc, e_t, alpha=-2.0)  # (G, m, K)
        best, idx = partial.min(dim=-1)  # first index on ties: deterministic codes
        codes[:, start : start + step] = idx
        dists[:, start : start + step] = (best + xc.pow(2).sum(-1)).clamp_min_(0.0)
    return codes, dists


def _nearest_bf16(x: Tensor, embed: Tensor, exact: Tensor | None = None, rerank: int = 2) -> Tensor:
    """x (G, M, Dg) bfloat16, embed (G, K, Dg) float32 -> codes (G, M) int64.

    A cheap first pass and an exact second: argmin ||x - e||^2 = argmax (x e^T - ||e||^2 / 2)
    with the matmul in bf16 (its output rounded to bf16, about 3 significant digits of each dot
    product) and the subtraction in float32 picks each row's `rerank` best candidates, which
    are then ranked by their exact float32 distance to `exact` (x in float32; default x). The
    bf16 pass alone (rerank=1) misses the nearest code on about 6 % of SmolLM2's rows; among
    its two best it almost never does. Chunked over M like _nearest.
    """
    num_groups, num_tokens, group_dim = x.shape
    size = embed.shape[1]
    rerank = min(rerank, size)
    e_half = 0.5 * embed.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K) float32
    e_t = embed.transpose(1, 2).to(torch.bfloat16)  # (G, Dg, K)
    step = max(1, _DIST_CHUNK_ELEMENTS // (num_groups * size))
    codes = torch.empty(num_groups, num_tokens, dtype=torch.long, device=x.device)
    for start in range(0, num_tokens, step):
        rows = slice(start, start + step)
        scores = torch.bmm(x[:, rows], e_t).float().sub_(e_half)  # (G, m, K)
        if rerank <= 1:
            codes[:, rows] = scores.max(dim=-1).indices
            continue
        candidates = scores.topk(rerank, dim=-1).indices  # (G, m, c), best first
        m = candidates.shape[1]
        flat = candidates.reshape(num_groups, m * rerank, 1).expand(-1, -1, group_dim)
        # (G, m*c, Dg) -> (G, m, c, Dg): each row's candidate codes
        near = embed.gather(1, flat).reshape(num_groups, m, rerank, group_dim)
        point = (x if exact is None else exact)[:, rows].float().unsqueeze(2)  # (G, m, 1, Dg)
        best = (near - point).pow(2).sum(-1).argmin(-1, keepdim=True)  # (G, m, 1)
        codes[:, rows] = candidates.gather(-1, best).squeeze(-1)
    return codes


def pca_tables(embed: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """embed (G, K, Dg) float32 -> the "pca" search's tables: basis (G, Dg, r), the leading
    directions of the codes' second moment; the projected codes transposed (G, r, K) and half
    their squared norms (G, 1, K); half the codes' full squared norms (G, K)."""
    _, vectors = torch.linalg.eigh(embed.transpose(1, 2) @ embed)  # ascending eigenvalues
    basis = vectors[..., -rank:].contiguous()  # (G, Dg, r)
    projected = embed @ basis  # (G, K, r)
    half_sq = 0.5 * projected.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
    return basis, projected.transpose(1, 2).contiguous(), half_sq, 0.5 * embed.pow(2).sum(-1)


def _nearest_pca(
    x: Tensor, embed: Tensor, tables: tuple[Tensor, ...], candidates: int = 4
) -> Tensor:
    """x (G, M, Dg), embed (G, K, Dg), both float32 -> codes (G, M) int64.

    argmin ||P(x - e)||^2 in the r leading principal directions P of the codes (a third of the
    dimensions hold nearly all of their spread) picks each row's `candidates` best, which are
    then ranked by their exact distance in all Dg dimensions, argmax x.e - ||e||^2 / 2 as the
    exact search computes it. Chunked over M like _nearest."""
    basis, projected_t, half_sq, full_half_sq = tables
    num_groups, num_tokens, group_dim = x.shape
    size = embed.shape[1]
    candidates = min(candidates, size)
    table = embed.reshape(num_groups * size, group_dim)  # (G*K, Dg): one row per code
    offsets = (torch.arange(num_groups, device=x.device) * size).view(num_groups, 1, 1)
    step = max(1, _DIST_CHUNK_ELEMENTS // (num_groups * size))
    codes = torch.empty(num_groups, num_tokens, dtype=torch.long, device=x.device)
    for start in range(0, num_tokens, step):
        rows = x[:, start : start + step]  # (G, m, Dg)
        scores = torch.baddbmm(half_sq, torch.bmm(rows, basis), projected_t, beta=-1.0)
        best = scores.topk(candidates, dim=-1).indices  # (G, m, c): largest x.e - |e|^2/2
        flat = (best + offsets).reshape(-1)  # (G*m*c,) rows of `table`
        near = table.index_select(0, flat).view(*best.shape, group_dim)  # (G, m, c, Dg)
        exact = torch.einsum("gmcd,gmd->gmc", near, rows) - full_half_sq.view(-1)[flat].view(
            best.shape
        )  # (G, m, c)
        codes[:, start : start + step] = best.gather(-1, exact.argmax(-1, keepdim=True))[..., 0]
    return codes


def _group_sums(x: Tensor, codes: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """x (G, M, Dg), codes (G, M) -> counts (G, K) float32, sums (G, K, Dg) float32."""
    num_groups, _, group_dim = x.shape
    offsets = torch.arange(num_groups, device=x.device).unsqueeze(1) * size  # (G, 1)
    flat = (codes + offsets).reshape(-1)  # (G*M,) row index into a (G*K, Dg) table
    counts = torch.bincount(flat, minlength=num_groups * size).to(x.dtype)
    sums = x.new_zeros(num_groups * size, group_dim).index_add_(0, flat, x.reshape(-1, group_dim))
    # (G*K,) -> (G, K) and (G*K, Dg) -> (G, K, Dg)
    return counts.reshape(num_groups, size), sums.reshape(num_groups, size, group_dim)


class GroupedCodebook(nn.Module):
    """G independent codebooks of K codes of width D/G; `codes (..., G)` are what is sent.

    Buffers (all in the state_dict): `embed (G, K, D/G)`, EMA `cluster_size (G, K)` and
    `embed_avg (G, K, D/G)`, and `initted` (K-means init done). Keep the module in float32 even
    when the model runs in half precision: the EMA sums need it.
    """

    embed: Tensor
    cluster_size: Tensor
    embed_avg: Tensor
    initted: Tensor

    def __init__(
        self,
        dim: int,
        num_groups: int = 1,
        codebook_size: int = 1024,
        *,
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1e-2,
        commitment_weight: float = 2e-4,
    ) -> None:
        super().__init__()
        self.config = CodebookConfig(
            dim=dim,
            num_groups=num_groups,
            codebook_size=codebook_size,
            ema_decay=ema_decay,
            eps=eps,
            dead_code_threshold=dead_code_threshold,
            commitment_weight=commitment_weight,
        )
        shape = (num_groups, codebook_size, self.config.group_dim)
        # Placeholder until kmeans_init_ (explicit, or lazily on the first training forward).
        embed = torch.randn(shape)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(shape[:2]))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(False))
        # the search `encode` runs when not told (None: by the input's dtype); a setting, not
        # state: `astra eval --search` sets it so the simulation searches as the runtime does
        self.search: str | None = None
        self._pca: tuple | None = None  # (embed, its version, pca_tables) for "pca"

    @classmethod
    def from_config(cls, config: CodebookConfig) -> GroupedCodebook:
        return cls(**asdict(config))

    @property
    def bits_per_code(self) -> int:
        return self.config.bits_per_code

    @property
    def bits_per_token(self) -> int:
        return self.config.bits_per_token

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, num_groups={c.num_groups}, codebook_size={c.codebook_size}"

    # -- encode / decode -----------------------------------------------------------------------

    def _to_groups(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """x (..., D) any float dtype -> (G, M, Dg) in `dtype`, detached."""
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"expected last dim {self.config.dim}, got shape {tuple(x.shape)}")
        g, dg = self.config.num_groups, self.config.group_dim
        # (..., D) -> (M, G, Dg) -> (G, M, Dg)
        return x.detach().to(dtype).reshape(-1, g, dg).transpose(0, 1)

    def encode(self, x: Tensor, search: str | None = None) -> Tensor:
        """x (..., D) -> codes (..., G) int64 in [0, K): nearest code per group (squared L2).

        `search` (one of SEARCH_KINDS), None: the codebook's `search` setting, and if that is
        None too, "float32" except for bfloat16 inputs (a model running in bf16), "bfloat16".
        - "float32": every distance, exactly (a (M x Dg) x (Dg x K) product per group).
        - "bfloat16": the dot products with the codes in bf16, where AMX, AVX-512 BF16 and
          tensor cores are several times faster, the comparison in float32, and each row's two
          best candidates re-ranked exactly (`_nearest_bf16`): the exact nearest code on
          98.9-99.9 % of rows (SmolLM2's and DINOv2's, benchmarks/latency.md).
        - "pca": a first pass in the codebook's Dg/3 leading principal directions (a third of
          the dot products), its four best candidates re-ranked exactly (`_nearest_pca`):
          1.3-1.5x faster than "float32" on one AVX2 core at 99.4-99.5 % of rows exact
          (benchmarks/search_alternatives.py). Groups narrower than MIN_PCA_DIM search exactly.
        The sender's choice never reaches the receiver, which decodes whatever codes arrive.
        """
        if search is None:
            search = self.search
        if search is not None and search not in SEARCH_KINDS:
            raise ValueError(f"search must be None or one of {SEARCH_KINDS}, got {search!r}")
        if search is None:
            search = "bfloat16" if x.dtype == torch.bfloat16 else "float32"
        if search == "pca" and self.config.group_dim < MIN_PCA_DIM:
            search = "float32"
        if search == "bfloat16":  # exact re-rank against x as it came
            groups = self._to_groups(x, torch.bfloat16)  # (G, M, Dg)
            codes = _nearest_bf16(groups, self.embed.float(), self._to_groups(x, x.dtype))
        elif search == "pca":
            codes = _nearest_pca(self._to_groups(x), self.embed.float(), self._pca_tables())
        else:
            codes, _ = _nearest(self._to_groups(x), self.embed.float())  # (G, M)
        return codes.t().reshape(*x.shape[:-1], self.config.num_groups)  # (M, G) -> (..., G)

    def prepare_search_(self, search: str | None) -> None:
        """Build what `search` needs now rather than in the first encode: the "pca" tables
        (an eigendecomposition of a Dg x Dg matrix per group, about 30 ms at Dg=384 on one
        core) belong to setting up a device, like its weights, not to its first prefill."""
        if search == "pca" and self.config.group_dim >= MIN_PCA_DIM:
            self._pca_tables()

    def _pca_tables(self) -> tuple[Tensor, ...]:
        """The "pca" search's per-codebook tables, rebuilt when `embed` changes (EMA updates,
        K-means init and state-dict loads all write it in place, which bumps its version)."""
        # the very tensor (held, so its identity stays unique) at the same version; an
        # inference-mode tensor keeps no version counter (and is not trained in place)
        embed = self.embed
        version = None if embed.is_inference() else embed._version
        if self._pca is None or self._pca[0] is not embed or self._pca[1] != version:
            self._pca = (embed, version, pca_tables(embed.float(), self.config.group_dim // 3))
        return self._pca[2]

    def decode(self, codes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """codes (..., G) -> x_hat (..., D) in `dtype` (default: the codebook's, float32).

        Out-of-range codes raise (IndexError on CPU) rather than read a neighbouring group.
        """
        g = self.config.num_groups
        if codes.shape[-1:] != (g,) or codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(
                f"expected integer codes (..., {g}), got {codes.dtype} {tuple(codes.shape)}"
            )
        flat = codes.reshape(-1, g).long()  # (M, G)
        group = torch.arange(g, device=codes.device).unsqueeze(0)  # (1, G)
        x_hat = self.embed[group, flat]  # (M, G, Dg)
        x_hat = x_hat.reshape(*codes.shape[:-1], self.config.dim)  # (M, G, Dg) -> (..., D)
        return x_hat if dtype is None else x_hat.to(dtype)

    def forward(self, x: Tensor, *, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., D) -> (x_q (..., D) in x.dtype, codes (..., G), commit_loss scalar float32).

        x_q has the value of decode(codes) exactly and the gradient of x (straight-through
        estimator). commit_loss = beta * mean over all elements of (x - sg(x_hat))^2 (Eq. 2):
        averaging over tokens *and* dims keeps beta independent of D, G, batch and sequence
        length, which is how VQ-VAE code computes it (F.mse_loss), i.e. the scale on which the
        paper compares its beta with the VQ-VAE default 0.25. The EMA update (and the lazy K-means
        init on the first batch) runs only when self.training and update.
        """
        do_update = self.training and update
        if do_update and not bool(self.initted):
            self.kmeans_init_(x.detach().reshape(-1, self.config.dim))
        codes = self.encode(x)
        x_hat = self.decode(codes)  # float32, from the codebook *before* this step's update
        if x.numel() > 0:
            diff = x.float() - x_hat  # x_hat is a buffer lookup: already no gradient (sg)
            commit_loss = self.config.commitment_weight * diff.pow(2).mean()
        else:
            commit_loss = x.new_zeros((), dtype=torch.float32)
        if do_update:
            self._ema_update_(x, codes)
        x_hat = x_hat.to(x.dtype)
        if x.requires_grad:
            # Straight-through: value x_hat, gradient of x. Same as x + (x_hat - x).detach() but
            # exact in floating point (x - x.detach() == 0 exactly), so x_q equals decode(codes)
            # bit for bit in training too (against the codebook before this step's EMA update).
            x_hat = x_hat + (x - x.detach())
        return x_hat, codes, commit_loss

    # -- training: EMA, dead codes, K-means ----------------------------------------------------

    @torch.no_grad()
    def _ema_update_(self, x: Tensor, codes: Tensor) -> None:
        c = self.config
        x_g = self._to_groups(x)  # (G, M, Dg)
        codes_g = codes.reshape(-1, c.num_groups).t()  # (..., G) -> (M, G) -> (G, M)
        counts, sums = _group_sums(x_g, codes_g, c.codebook_size)
        weight = 1.0 - c.ema_decay
        self.cluster_size.lerp_(counts, weight)
        self.embed_avg.lerp_(sums, weight)
        # Laplace smoothing: never divide by an empty cluster, total mass preserved.
        total = self.cluster_size.sum(-1, keepdim=True)  # (G, 1)
        size = c.codebook_size
        smoothed = (self.cluster_size + c.eps) / (total + size * c.eps) * total  # (G, K)
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(-1))
        self._restart_dead_codes_(x_g)

    @torch.no_grad()
    def _restart_dead_codes_(self, x_g: Tensor) -> None:
        """Move codes whose EMA cluster size fell below the threshold onto random inputs.

        Vectorised with torch.where (no host sync): every code draws a candidate, only dead
        codes take it. A restarted code gets cluster size max(1, 2 * threshold), a grace period
        of several hundred updates at decay 0.99 to attract tokens before it can die again.
        """
        threshold = self.config.dead_code_threshold
        num_groups, num_tokens, _ = x_g.shape
        if threshold <= 0.0 or num_tokens == 0:
            return
        dead = self.cluster_size < threshold  # (G, K)
        pick = torch.randint(num_tokens, dead.shape, device=x_g.device)  # (G, K)
        group = torch.arange(num_groups, device=x_g.device).unsqueeze(1)  # (G, 1)
        samples = x_g[group, pick]  # (G, K, Dg)
        reset = max(1.0, 2.0 * threshold)
        self.embed.copy_(torch.where(dead.unsqueeze(-1), samples, self.embed))
        self.embed_avg.copy_(torch.where(dead.unsqueeze(-1), samples * reset, self.embed_avg))
        self.cluster_size.masked_fill_(dead, reset)

    @torch.no_grad()
    def kmeans_init_(
        self,
        samples: Tensor,
        num_iters: int = 10,
        seed: int = 0,
        init: str = "kmeans++",
        seeds: Tensor | None = None,
    ) -> Tensor:
        """Per-group K-means on activations `samples (N, D)` (§3.2: init from the pretrained model).

        init: "kmeans++" (seeding on a random pool of <= 4K points, in 32 rounds:
        `kmeans_plus_plus_rounds`) or "random" (K distinct samples). Then `num_iters` Lloyd
        iterations on all samples (`lloyd`: searches pruned by the triangle inequality; they stop
        early at a fixed point); empty clusters are re-seeded at the points farthest from their
        centre. N < K:
        warns and uses every sample once plus random repeats (sampling with replacement), so the
        samples are quantized exactly. `seeds` (G, K, Dg): starting centres already drawn
        (`seed_codebooks`), instead of `init`.

        Returns the samples' codes (N, G) under the final codebook: their nearest codes, what
        `encode(samples)` gives (bar near-ties, within 1.2e-4 relative at K = 1024).
        """
        if init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got init={init!r}")
        if num_iters < 0:
            raise ValueError(f"num_iters must be >= 0, got num_iters={num_iters}")
        x = self._to_groups(samples).contiguous()  # (G, N, Dg)
        num_groups, num_samples, _ = x.shape
        size = self.config.codebook_size
        if num_samples == 0:
            raise ValueError("kmeans_init_ needs at least one sample, got N=0")
        gen = torch.Generator(device=x.device).manual_seed(seed)
        group = torch.arange(num_groups, device=x.device).unsqueeze(1)  # (G, 1)
        if num_samples < size:
            warnings.warn(
                f"kmeans_init_: N={num_samples} samples < codebook_size K={size}; "
                "sampling codes with replacement (duplicate codes)",
                stacklevel=2,
            )
            extra = torch.randint(
                num_samples, (size - num_samples,), generator=gen, device=x.device
            )
            pick = torch.cat([torch.arange(num_samples, device=x.device), extra])  # (K,)
            centers = x[:, pick]  # (G, K, Dg)
        elif init == "random":
            order = torch.rand(num_groups, num_samples, generator=gen, device=x.device)
            centers = x[group, order.argsort(dim=1)[:, :size]]  # (G, K, Dg)
        elif seeds is not None:
            centers = seeds.to(x.dtype)
        else:
            centers = kmeans_plus_plus_rounds(x, size, gen)
        if num_samples >= size:
            centers, codes, _ = lloyd(x, centers, num_iters)
        else:
            codes, _ = _nearest(x, centers)
        self.set_centers_(centers, codes)
        return codes.t()  # (G, N) -> (N, G)

    @torch.no_grad()
    def set_centers_(self, centers: Tensor, codes: Tensor) -> None:
        """Take K-means centres (G, K, Dg) and the samples' codes (G, N) as the codebook: EMA
        cluster sizes are the samples per code, so EMA training continues from K-means."""
        num_groups, size = codes.shape[0], self.config.codebook_size
        offsets = torch.arange(num_groups, device=codes.device).unsqueeze(1) * size  # (G, 1)
        flat = (codes + offsets).reshape(-1)  # (G*N,) rows of a (G*K,) table
        counts = torch.bincount(flat, minlength=num_groups * size).to(centers.dtype)
        counts = counts.reshape(num_groups, size)  # (G*K,) -> (G, K)
        self.embed.copy_(centers)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(centers * counts.unsqueeze(-1))
        self.initted.fill_(True)

    # -- runtime fast path -----------------------------------------------------------------------

    def lookup_table(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Project every code once: table (G, K, D_out) with
        `table_sum(table, codes) == decode(codes) @ weight.T + bias` (up to float rounding).

        A receiver rebuilds remote K/V (§3.1: K_hat, V_hat are linear projections of X_hat) with
        G row lookups and adds per token instead of a D x D_out matmul. The bias is folded into
        group 0 so that it is added exactly once. Memory G*K*D_out: worth it when G*K <~ D*T_remote.
        """
        d_out, d_in = weight.shape
        if d_in != self.config.dim:
            raise ValueError(
                f"weight must be (D_out, {self.config.dim}), got {tuple(weight.shape)}"
            )
        g, dg = self.config.num_groups, self.config.group_dim
        # (D_out, D) -> (D_out, G, Dg) -> (G, Dg, D_out)
        w = weight.float().reshape(d_out, g, dg).permute(1, 2, 0)
        table = torch.bmm(self.embed.float(), w)  # (G, K, D_out)
        if bias is not None:
            table[0] += bias.float()
        return table.to(weight.dtype)


def table_sum(table: Tensor, codes: Tensor) -> Tensor:
    """table (G, K, D_out) from `lookup_table`, codes (..., G) -> (..., D_out).

    Gathers table[g, codes[..., g]] and sums over g in one fused embedding_bag. Codes must be in
    [0, K): a code >= K would read the next group's rows (not checked, to avoid a host sync).
    """
    num_groups, size, d_out = table.shape
    offsets = torch.arange(num_groups, device=codes.device) * size  # (G,)
    flat = codes.reshape(-1, num_groups).long() + offsets  # (M, G) rows of the (G*K, D_out) table
    if flat.shape[0] == 0:
        return table.new_zeros(*codes.shape[:-1], d_out)
    out = F.embedding_bag(flat, table.reshape(-1, d_out), mode="sum")  # (M, D_out)
    return out.reshape(*codes.shape[:-1], d_out)


def seed_codebooks(
    codebooks: list[GroupedCodebook], samples: list[Tensor], seed: int = 0
) -> list[Tensor | None]:
    """k-means++ seeds (G, K, Dg) for many codebooks at once (None where N < K).

    Seeding is K sequential draws; run per codebook it is most of a calibration (SmolLM2, G=32,
    K=1024: 60 codebooks x 1024 draws of a few small ops each). Codebooks of one shape are
    stacked along the group axis and seeded together: the same D^2 sampling per group, K draws
    in all instead of K per codebook. Each group draws from its own pool, so the result is a
    k-means++ seeding of every codebook, as `kmeans_init_` would make with its own generator.
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor | None] = [None] * len(codebooks)
    shapes: dict[tuple, list[int]] = {}
    for i, (codebook, x) in enumerate(zip(codebooks, samples)):
        c = codebook.config
        if x.shape[0] >= c.codebook_size:
            shapes.setdefault((c.codebook_size, c.group_dim, x.shape[0]), []).append(i)
    for (size, _, _), members in shapes.items():
        # (N, D) each -> (G_i, N, Dg) -> (sum G_i, N, Dg)
        grouped = [codebooks[i]._to_groups(samples[i]).float() for i in members]
        centers = _kmeans_plus_plus(torch.cat(grouped).contiguous(), size, gen)
        for i, part in zip(members, centers.split([g.shape[0] for g in grouped])):
            out[i] = part  # (G_i, K, Dg)
    return out


def _kmeans_plus_plus(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """x (G, N, Dg) -> centres (G, K, Dg) by k-means++ seeding, all groups at once."""
    num_groups, num_samples, group_dim = x.shape
    group = torch.arange(num_groups, device=x.device)  # (G,)
    pool_size = min(num_samples, _SEED_POOL_PER_CODE * size)
    order = torch.rand(num_groups, num_samples, generator=gen, device=x.device)
    pool = x[group.unsqueeze(1), order.argsort(dim=1)[:, :pool_size]]  # (G, P, Dg)
    pool_sq = pool.pow(2).sum(-1)  # (G, P)
    centers = x.new_empty(num_groups, size, group_dim)
    pick = torch.randint(pool_size, (num_groups,), generator=gen, device=x.device)  # (G,)
    min_d = x.new_full((num_groups, pool_size), float("inf"))
    for k in range(size):
        if k > 0:
            # D^2 sampling by inverse CDF (several times cheaper than torch.multinomial per row);
            # rows whose points all coincide with centres fall back to uniform.
            weights = torch.where(min_d.sum(1, keepdim=True) > 0, min_d, torch.ones_like(min_d))
            cdf = weights.cumsum(dim=1)  # (G, P)
            u = torch.rand(num_groups, 1, generator=gen, device=x.device) * cdf[:, -1:]  # (G, 1)
            # right=True: first index with cdf > u, so a zero-weight point (a centre) is never drawn
            pick = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max_(pool_size - 1)
        c = pool[group, pick]  # (G, Dg)
        centers[:, k] = c
        cross = torch.bmm(pool, c.unsqueeze(-1)).squeeze(-1)  # (G, P, Dg) @ (G, Dg, 1) -> (G, P)
        d = (pool_sq - 2.0 * cross + c.pow(2).sum(-1, keepdim=True)).clamp_min_(0.0)
        min_d = torch.minimum(min_d, d)
    return centers


def _lloyd_centers(x: Tensor, codes: Tensor, dists: Tensor, size: int) -> Tensor:
    """One Lloyd update: x (G, N, Dg), assignment codes/dists (G, N) -> centres (G, K, Dg).

    An empty cluster is re-seeded at a point badly served by the current centres: the r-th empty
    cluster of a group takes that group's r-th farthest point (distinct points). Needs N >= K.
    """
    num_groups = x.shape[0]
    counts, sums = _group_sums(x, codes, size)
    centers = sums / counts.clamp_min(1.0).unsqueeze(-1)  # (G, K, Dg)
    empty = counts == 0  # (G, K)
    num_empty = int(empty.sum(1).max())  # host sync: most steps have none, and skip the top-k
    if num_empty == 0:
        return centers
    far = dists.topk(num_empty, dim=1).indices  # (G, E) point indices, farthest first
    rank = (empty.long().cumsum(dim=1) - 1).clamp_min_(0)  # (G, K) r-th empty cluster -> r
    group = torch.arange(num_groups, device=x.device).unsqueeze(1)  # (G, 1)
    seeds = x[group, far.gather(1, rank)]  # (G, K, Dg)
    return torch.where(empty.unsqueeze(-1), seeds, centers)


# -- calibration: k-means++ in rounds, pruned Lloyd --------------------------------------------


def kmeans_plus_plus_rounds(
    x: Tensor, size: int, gen: torch.Generator, num_rounds: int = _SEED_ROUNDS
) -> Tensor:
    """x (G, N, Dg) -> centres (G, K, Dg): k-means++ seeding in `num_rounds` rounds, each drawing
    ceil(K / num_rounds) centres from one D^2 distribution (with replacement) instead of one.

    One-at-a-time k-means++ is K sequential draws, each a pass over the whole pool for one new
    centre (memory-bound: `_kmeans_plus_plus`); here a round is one (P, Dg) x (Dg, K/32) matmul,
    so the same D^2 sampling costs 32 passes. Within a round the draws do not repel each other
    (k-means|| oversamples the same way); a duplicate centre ends up empty and Lloyd re-seeds it.
    Every centre is one of the group's samples, drawn from a random pool of <= 4K of them.
    """
    draws_per_round = -(-size // num_rounds)  # ceil
    num_groups, num_samples, group_dim = x.shape
    group = torch.arange(num_groups, device=x.device).unsqueeze(1)  # (G, 1)
    pool_size = min(num_samples, _SEED_POOL_PER_CODE * size)
    order = torch.rand(num_groups, num_samples, generator=gen, device=x.device)
    pool = x[group, order.argsort(dim=1)[:, :pool_size]]  # (G, P, Dg)
    pool_sq = pool.pow(2).sum(-1)  # (G, P)
    centers = x.new_empty(num_groups, size, group_dim)
    min_d = x.new_full((num_groups, pool_size), float("inf"))
    pick = torch.randint(pool_size, (num_groups, 1), generator=gen, device=x.device)  # (G, 1)
    done = 0
    while True:
        new = pool[group, pick]  # (G, m, Dg)
        centers[:, done : done + new.shape[1]] = new
        done += new.shape[1]
        if done == size:
            return centers
        # ||p - c||^2 = ||p||^2 - 2 p.c + ||c||^2 for the m new centres, min over them
        cross = torch.baddbmm(new.pow(2).sum(-1).unsqueeze(1), pool, new.transpose(1, 2),
                              alpha=-2.0)  # (G, P, m)  # fmt: skip
        min_d = torch.minimum(min_d, (cross.amin(-1) + pool_sq).clamp_min_(0.0))
        # D^2 sampling by inverse CDF; rows whose points all coincide with centres: uniform
        weights = torch.where(min_d.sum(1, keepdim=True) > 0, min_d, torch.ones_like(min_d))
        cdf = weights.cumsum(dim=1)  # (G, P)
        m = min(draws_per_round, size - done)
        u = torch.rand(num_groups, m, generator=gen, device=x.device) * cdf[:, -1:]  # (G, m)
        # right=True: first index with cdf > u, so a zero-weight point (a centre) is never drawn
        pick = torch.searchsorted(cdf, u, right=True).clamp_max_(pool_size - 1)  # (G, m)


def _nearest_two(x: Tensor, embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (G, M, Dg), embed (G, S, Dg) float32 -> (code (G, M) int64, best (G, M), second (G, M)):
    the nearest code and the squared distances to it and to the next nearest (inf when S = 1).

    The (G, M, S) distances are made in blocks of about `_BLOCK_ELEMENTS` floats (1 MiB, a core's
    L2), each reduced right away: a (G, M, S) block in L3 or memory makes the search memory-bound.
    The reduction is a vectorised int32 amin instead of min-with-indices (4x slower on CPU): the
    code goes in the low ceil(log2 S) mantissa bits of each non-negative float32 distance, whose
    bit pattern orders like the float. So distances within 2^(log2 S - 23) of each other (1.2e-4
    relative at S = 1024) count as ties, won by the lowest code (exact ties: first index, as
    `_nearest`); best and second are those truncated distances, to 1.2e-4.
    """
    num_groups, num_rows, group_dim = x.shape
    size = embed.shape[1]
    bits = max(1, (size - 1).bit_length())
    high = -(1 << bits)  # int32 mask of the bits above the code
    # ||x - e||^2 as one matmul, no bias term to broadcast into every block:
    # [x, 1, ||x||^2] . [-2e, ||e||^2, 1]
    x_aug = torch.cat([x, x.new_ones(num_groups, num_rows, 1), x.pow(2).sum(-1, keepdim=True)], -1)
    e_aug = torch.cat([-2.0 * embed, embed.pow(2).sum(-1, keepdim=True),
                       embed.new_ones(num_groups, size, 1)], -1)  # fmt: skip
    e_t = e_aug.transpose(1, 2).contiguous()  # (G, Dg + 2, S)
    code_bits = torch.arange(size, dtype=torch.int32, device=x.device)  # (S,)
    # blocks of (groups, rows): all groups at once when >= 64 rows fit, else fewer groups
    if num_groups * 64 * size <= _BLOCK_ELEMENTS:
        group_step, row_step = num_groups, max(64, _BLOCK_ELEMENTS // (num_groups * size))
    else:
        group_step = max(1, _BLOCK_ELEMENTS // (256 * size))
        row_step = max(64, _BLOCK_ELEMENTS // (group_step * size))
    top = torch.iinfo(torch.int32).max
    first = torch.empty(num_groups, num_rows, dtype=torch.int32, device=x.device)
    second = torch.full((num_groups, num_rows), top, dtype=torch.int32, device=x.device)
    for g in range(0, num_groups, group_step):
        g_end = min(g + group_step, num_groups)
        for r in range(0, num_rows, row_step):
            r_end = min(r + row_step, num_rows)
            block = torch.bmm(x_aug[g:g_end, r:r_end], e_t[g:g_end])  # (g, r, S) float32
            # a distance that rounding made slightly negative is a negative int: it wins, as
            # the ~0 distance it is (clamped below)
            packed = block.view(torch.int32).bitwise_and_(high).bitwise_or_(code_bits)
            low = torch.amin(packed, dim=-1, out=first[g:g_end, r:r_end])  # (g, r)
            if size > 1:
                packed.scatter_(-1, (low & ~high).long().unsqueeze(-1), top)
                torch.amin(packed, dim=-1, out=second[g:g_end, r:r_end])
    codes = (first & ~high).long()
    best = (first & high).view(torch.float32).clamp_min(0.0)
    second = torch.where(second == top, float("inf"), (second & high).view(torch.float32))
    return codes, best, second.clamp_min_(0.0)


def lloyd(x: Tensor, centers: Tensor, num_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """`num_iters` Lloyd iterations from `centers` (G, K, Dg) on x (G, N, Dg), then the final
    assignment: (centres (G, K, Dg), codes (G, N), squared distances (G, N)).

    The iterations of `lloyd_dense` with the search pruned by the triangle inequality (Hamerly's
    bounds, sharpened per centre). Every point keeps u, its distance to its centre, and l, a
    lower bound on its distance to every other centre. After the centres move by delta, only a
    centre j with delta_j > l - u can have come nearer than the point's own: a point searches the
    centres that moved most, in prefixes of 16, 64, 256 or all K of them. A step in which no code
    changes is a fixed point: the iterations stop there. The search (`_nearest_two`) counts
    distances within 1.2e-4 (relative, K = 1024) of each other as ties, so the result is plain
    Lloyd's up to those near-ties. On SmolLM2's kv activations (G=32, K=1024, N=8192) ten
    iterations cost about 7 full searches instead of 11, each 2.5x faster than `_nearest`.
    """
    num_groups, num_samples, _ = x.shape
    size = centers.shape[1]
    codes = torch.zeros(num_groups, num_samples, dtype=torch.long, device=x.device)
    near = x.new_zeros(num_groups, num_samples)  # u: distance to the own centre
    lower = x.new_full((num_groups, num_samples), float("-inf"))  # l: lower bound, others
    delta = x.new_full((num_groups, size), float("inf"))  # centre moves since the last step
    group = torch.arange(num_groups, device=x.device).unsqueeze(1)  # (G, 1)
    for step in range(num_iters + 1):
        if step > 0:
            moved = _lloyd_centers(x, codes, near.square(), size)
            delta = (moved - centers).norm(dim=-1)  # (G, K)
            centers = moved
            near = (x - centers[group, codes]).norm(dim=-1)  # exact, for the moved centre
        changed = _pruned_assign_(x, centers, delta, codes, near, lower)
        if step > 0 and not changed:
            break
    return centers, codes, near.square()


def _pruned_assign_(
    x: Tensor, centers: Tensor, delta: Tensor, codes: Tensor, near: Tensor, lower: Tensor
) -> bool:
    """One Lloyd assignment in place: codes, near (u), lower (l), all (G, N). Returns whether a
    code changed."""
    num_groups, num_samples, _ = x.shape
    size = centers.shape[1]
    if bool(torch.isinf(delta).all()):  # nothing known yet: a full search
        found, best_sq, second_sq = _nearest_two(x, centers)
        codes.copy_(found)
        near.copy_(best_sq.sqrt_())
        lower.copy_(second_sq.sqrt_())
        return True
    order = delta.argsort(dim=1, descending=True)  # (G, K) centres, most moved first
    delta_sorted = delta.gather(1, order)  # (G, K) descending
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(size, device=x.device).expand(num_groups, size)
    )  # (G, K) centre -> its place in `order`
    tiers = [t for t in _PRUNE_TIERS if t < size] + [size]
    # a centre j can beat the point's own only if delta_j > l - u (margin: float rounding), and
    # at most t centres moved more than l - u when the (t+1)-th largest move is <= l - u
    gap = lower - near - 1e-4 * (lower.abs() + near)  # (G, N)
    bounds = delta_sorted[:, [0] + tiers[:-1]]  # (G, T)
    # (G, N) i: tiers[i-1]. Level 0 (no centre moved that far) would keep the code with l
    # lowered by the largest move; searching the 16 that moved most instead costs little and
    # lowers l only by the 17th largest move, so that later steps can skip more.
    level = (gap.unsqueeze(-1) < bounds.unsqueeze(1)).sum(-1).clamp_min_(1)
    flat_codes, flat_near, flat_lower = codes.view(-1), near.view(-1), lower.view(-1)
    changed = False
    for i, tier in enumerate(tiers, start=1):
        take = level == i  # (G, N)
        counts = take.sum(1)  # (G,)
        points = take.view(-1).nonzero().squeeze(1)  # (E,) flat g * N + n, group-major
        if points.shape[0] == 0:
            continue
        g_idx = points // num_samples  # (E,)
        # the candidates: the `tier` centres that moved most, in index order (ties go to the
        # lowest code, as in _nearest), or all K
        prefix = order[:, :tier].sort(dim=1).values if tier < size else None  # (G, T)
        if tier <= 64:
            found, best_sq, second_sq = _search_padded(x, centers, prefix, points, counts)
        else:
            found, best_sq, second_sq = _search_per_group(x, centers, prefix, points, counts)
        if prefix is not None:
            found = prefix.view(-1).index_select(0, g_idx * tier + found)
        best, second = best_sq.sqrt_(), second_sq.sqrt_()
        own = flat_codes.index_select(0, points)
        u, l_old = flat_near.index_select(0, points), flat_lower.index_select(0, points)
        # the point's own centre is a candidate
        own_searched = rank.view(-1).index_select(0, g_idx * size + own) < tier
        switch = own_searched | (best < u)
        new_code = torch.where(switch, found, own)
        new_l = torch.where(own_searched, second, torch.where(switch, torch.minimum(second, u),
                                                                 best))  # fmt: skip
        if tier < size:  # the centres not searched each moved at most delta_sorted[tier]
            rest = delta_sorted[:, tier].index_select(0, g_idx)
            new_l = torch.minimum(new_l, l_old - rest)
        changed = changed or bool((new_code != own).any())
        flat_codes.index_copy_(0, points, new_code)
        flat_near.index_copy_(0, points, torch.where(switch, best, u))
        flat_lower.index_copy_(0, points, new_l)
    return changed


def _search_padded(
    x: Tensor, centers: Tensor, prefix: Tensor | None, points: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`_nearest_two` of the points `points` (E,) (flat g * N + n) against their group's
    candidates, all groups in one batch padded to the largest count (for a few candidates)."""
    num_groups, num_samples, group_dim = x.shape
    g_idx = points // num_samples
    starts = counts.cumsum(0) - counts  # (G,)
    slot = torch.arange(points.shape[0], device=x.device) - starts[g_idx]  # (E,) place in group
    width = int(counts.max())
    rows = points.new_zeros(num_groups * width)  # padding: point 0, computed and dropped
    at = g_idx * width + slot  # (E,) place in the padded (G, R) batch
    rows.index_copy_(0, at, points)
    x_rows = x.reshape(-1, group_dim).index_select(0, rows)  # (G*R, Dg)
    cand = centers
    if prefix is not None:
        cand = centers.gather(1, prefix.unsqueeze(-1).expand(-1, -1, group_dim))  # (G, T, Dg)
    found, best, second = _nearest_two(x_rows.view(num_groups, width, group_dim), cand)
    return (found.view(-1).index_select(0, at), best.view(-1).index_select(0, at),
            second.view(-1).index_select(0, at))  # fmt: skip


def _search_per_group(
    x: Tensor, centers: Tensor, prefix: Tensor | None, points: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`_search_padded` one group at a time: no padding, for many candidates."""
    num_samples = x.shape[1]
    found = torch.empty_like(points)
    best = x.new_empty(points.shape)
    second = x.new_empty(points.shape)
    start = 0
    for g, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        part = slice(start, start + count)
        x_rows = x[g].index_select(0, points[part] - g * num_samples).unsqueeze(0)  # (1, c, Dg)
        cand = centers[g] if prefix is None else centers[g].index_select(0, prefix[g])
        f, b, s = _nearest_two(x_rows, cand.unsqueeze(0))
        found[part], best[part], second[part] = f[0], b[0], s[0]
        start += count
    return found, best, second


def lloyd_dense(x: Tensor, centers: Tensor, num_iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """`lloyd` without the pruning: every assignment a full search (the reference)."""
    size = centers.shape[1]
    codes, dists = _nearest(x, centers)
    for _ in range(num_iters):
        centers = _lloyd_centers(x, codes, dists, size)
        codes, dists = _nearest(x, centers)
    return centers, codes, dists
