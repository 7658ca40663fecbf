"""Noise-Augmented Quantization (NAVQ, ASTRA §3.3).

During fine-tuning the de-quantized embedding X_hat is replaced by X_tilde = X_hat + lam * xi,
xi ~ N(mu, Sigma), with mu and Sigma the empirical mean and covariance of the quantization residual
eps = X - X_hat over training data. At inference the noise is omitted (X_hat is used as is).

The paper leaves the form of Sigma open (§3.3; reconstruction notes §9 q4). Choices here:

- One `ResidualNoise` per codebook, i.e. per block, with statistics per VQ group: mu (G, D/G)
  and one covariance per group. Groups are quantized independently, so cross-group residual
  correlations are not modelled.
- Full covariance (default), stored as its Cholesky factor L (G, D/G, D/G) so that sampling is
  xi = mu + L z. Cost: G * (D/G)^2 floats (D^2 / G; 4 MiB per block for G=1, D=1024) and
  (D/G)^2 multiply-adds per group per token when sampling, i.e. D^2 / G per token, about a third
  of one QKV projection for G=1 and training-time only.
- `diagonal=True`: per-element std (G, D/G); O(D) memory and time, ignores correlations.
- Statistics are accumulated in float64 with Chan's parallel update (batch mean and M2 merged
  into the running ones), so `accumulate_` can stream over many batches without the
  cancellation of raw sums; `finalize_` turns them into (mu, L). Covariance is the unbiased
  estimate (divides by n - 1), like torch.cov.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ResidualNoise"]


class ResidualNoise(nn.Module):
    """Gaussian model of quantization residuals; `apply` adds lam * xi in training mode only.

    Saved state (state_dict): `mean (G, Dg)`, `scale (G, Dg, Dg)` lower-triangular Cholesky factor
    (or `(G, Dg)` std when diagonal), `fitted`. The float64 accumulators are not saved.
    """

    mean: Tensor
    scale: Tensor
    fitted: Tensor

    def __init__(self, dim: int, num_groups: int = 1, *, diagonal: bool = False) -> None:
        super().__init__()
        if dim < 1 or num_groups < 1 or dim % num_groups != 0:
            raise ValueError(
                f"num_groups={num_groups} must be >= 1 and divide dim={dim} (dim >= 1)"
            )
        self.dim, self.num_groups, self.diagonal = dim, num_groups, diagonal
        g, dg = num_groups, dim // num_groups
        self.register_buffer("mean", torch.zeros(g, dg))
        self.register_buffer("scale", torch.zeros((g, dg) if diagonal else (g, dg, dg)))
        self.register_buffer("fitted", torch.tensor(False))
        # Streaming accumulators: count, running mean (G, Dg) and M2 (G, Dg[, Dg]) in float64.
        f64 = torch.float64
        m2_shape = (g, dg) if diagonal else (g, dg, dg)
        self.register_buffer("_count", torch.zeros((), dtype=f64), persistent=False)
        self.register_buffer("_acc_mean", torch.zeros(g, dg, dtype=f64), persistent=False)
        self.register_buffer("_acc_m2", torch.zeros(m2_shape, dtype=f64), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_groups={self.num_groups}, diagonal={self.diagonal}"

    @property
    def covariance(self) -> Tensor:
        """Fitted covariance (G, Dg, Dg) = L L^T (diag(std^2) when diagonal)."""
        if self.diagonal:
            return torch.diag_embed(self.scale.pow(2))
        return self.scale @ self.scale.transpose(-1, -2)

    @torch.no_grad()
    def reset_(self) -> None:
        self._count.zero_()
        self._acc_mean.zero_()
        self._acc_m2.zero_()

    @torch.no_grad()
    def accumulate_(self, residuals: Tensor) -> None:
        """Add residuals eps = x - x_hat, shape (..., D), to the running statistics."""
        if residuals.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(residuals.shape)}")
        g, dg = self.num_groups, self.dim // self.num_groups
        r = residuals.detach().to(self._acc_mean).reshape(-1, g, dg)  # (..., D) -> (n, G, Dg)
        n_b = r.shape[0]
        if n_b == 0:
            return
        mean_b = r.mean(0)  # (G, Dg)
        c = r - mean_b  # (n, G, Dg)
        if self.diagonal:
            m2_b = c.pow(2).sum(0)  # (G, Dg)
        else:
            m2_b = torch.einsum("ngi,ngj->gij", c, c)  # (G, Dg, Dg)
        n_a = self._count.clone()
        n = n_a + n_b
        delta = mean_b - self._acc_mean  # (G, Dg)
        # Chan et al.: M2 = M2_a + M2_b + delta delta^T * n_a n_b / n
        outer = delta.pow(2) if self.diagonal else delta.unsqueeze(-1) * delta.unsqueeze(-2)
        self._acc_m2.add_(m2_b + outer * (n_a * n_b / n))
        self._acc_mean.add_(delta * (n_b / n))
        self._count.copy_(n)

    @torch.no_grad()
    def finalize_(self) -> None:
        """Turn the accumulated statistics into (mean, scale); needs at least 2 residuals."""
        n = float(self._count)
        if n < 2:
            raise RuntimeError(f"finalize_ needs >= 2 accumulated residual vectors, got {n:g}")
        cov = self._acc_m2 / (n - 1)
        self.mean.copy_(self._acc_mean)
        if self.diagonal:
            self.scale.copy_(cov.clamp_min(0.0).sqrt())
        else:
            self.scale.copy_(_cholesky_psd(cov))
        self.fitted.fill_(True)

    def fit_(self, residuals: Tensor) -> ResidualNoise:
        """One-shot fit: reset_, accumulate_(residuals (..., D)), finalize_."""
        self.reset_()
        self.accumulate_(residuals)
        self.finalize_()
        return self

    def sample(
        self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw xi ~ N(mu, Sigma) of `shape (..., D)`, float32 on the buffers' device."""
        shape = tuple(shape)
        if not shape or shape[-1] != self.dim:
            raise ValueError(f"shape must end in dim={self.dim}, got {shape}")
        g, dg = self.num_groups, self.dim // self.num_groups
        z = torch.randn(*shape[:-1], g, dg, generator=generator, device=self.mean.device)
        mean, scale = self.mean.float(), self.scale.float()
        if self.diagonal:
            xi = mean + scale * z  # (..., G, Dg)
        else:
            xi = mean + torch.einsum("gij,...gj->...gi", scale, z)  # L z per group: (..., G, Dg)
        return xi.reshape(shape)  # (..., G, Dg) -> (..., D)

    def apply(self, x_hat: Tensor, lam: float = 1.0) -> Tensor:
        """X_tilde = x_hat + lam * xi in training mode; x_hat itself (same object) in eval.

        Pass the straight-through x_q from GroupedCodebook.forward: the noise is a constant, so
        gradients still reach x. lam = 1.0 in the paper's main results (§3.3, Table 12).
        """
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be a finite value >= 0, got lam={lam}")
        if not self.training or lam == 0:
            return x_hat
        if not bool(self.fitted):
            raise RuntimeError("ResidualNoise.apply in training mode before fit_/finalize_")
        return x_hat + (lam * self.sample(x_hat.shape)).to(x_hat.dtype)


@torch.no_grad()
def _cholesky_psd(cov: Tensor) -> Tensor:
    """Cholesky factor of symmetric PSD cov (G, Dg, Dg), adding jitter if it is singular.

    Residual covariances can be rank-deficient (codes fitting some directions exactly, or fewer
    samples than Dg). Jitter grows from 1e-10 to 1e-2 times the mean variance; the last resort
    is the eigen square root V sqrt(max(w, 0)) -- not triangular, but L L^T is still cov.
    """
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    level = cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]  # (G, 1, 1)
    factor, info = torch.linalg.cholesky_ex(cov)
    for jitter in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        bad = info != 0  # (G,) only the failing groups get jitter
        if not bool(bad.any()):
            return factor
        retry, retry_info = torch.linalg.cholesky_ex(cov + jitter * level * eye)
        factor = torch.where(bad[:, None, None], retry, factor)
        info = torch.where(bad, retry_info, info)
    bad = info != 0
    if not bool(bad.any()):
        return factor
    w, v = torch.linalg.eigh(cov)
    root = v * w.clamp_min(0.0).sqrt().unsqueeze(-2)  # V diag(sqrt w): root root^T = cov
    return torch.where(bad[:, None, None], root, factor)
