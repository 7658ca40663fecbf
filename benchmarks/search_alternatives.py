"""Cheaper nearest-code searches than the brute-force GEMM, measured on real activations
(issue 12, item 2): what each costs and how often it misses the nearest code.

A sender's search is (rows x D) x (D x K) per codebook per block. Each alternative below
computes fewer dot products and then ranks a few candidates exactly:

- `bf16`: the runtime's own first pass in bf16 plus an exact re-rank of the two best
  (`GroupedCodebook.encode(x, "bfloat16")`); only fast on CPUs with native bf16.
- `runtime-pca`: the runtime's `--search pca` (`GroupedCodebook.encode(x, "pca")`): pca-D/3-4
  as shipped, with its re-rank as batched dot products.
- `pca-r-c`: the first pass in the r leading principal directions of the codebook, then the
  c best candidates ranked exactly in all D dimensions.
- `ivf-P-p`: the K codes clustered into P cells; each row searches the codes of its p nearest
  cells only (faiss's IVF idea, one matmul per cell).
- `bound-r-c`: like pca-r-c, but a row counts as certified only when its best exact distance
  is at most the (c+1)-th lower bound ||P(x - e)||^2 + (|r_x| - |r_e|)^2: the share of rows
  for which a first pass could prove its answer (the others would need the full search).

Rows are one sender's share of the built-in input (T / --devices), one thread, the minimum of
--repeats timings. `recall` is the share of rows given exactly the brute-force code;
`distortion` is the summed squared error over the brute force's (1.0 = as good).

    .venv/bin/python benchmarks/search_alternatives.py --model dinov2-s
    .venv/bin/python benchmarks/search_alternatives.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from astra.hub import resolve_model
from astra.models.loading import load_model
from astra.parallel.artefact import load_astra
from astra.parallel.passes import embed_inputs, native_bf16
from astra.provenance import provenance
from astra.runner import RunConfig, build_inputs, ensure_artefact
from astra.storage import write_json
from astra.vq.codebook import _nearest


def pca_basis(embed: Tensor, rank: int) -> Tensor:
    """embed (K, D) -> (D, r): the leading directions of the codes' second moment."""
    _, vectors = torch.linalg.eigh(embed.t() @ embed)  # ascending eigenvalues
    return vectors[:, -rank:].contiguous()


class PCASearch:
    def __init__(self, embed: Tensor, rank: int, candidates: int):
        self.embed, self.candidates = embed, candidates
        self.basis = pca_basis(embed, rank)  # (D, r)
        projected = embed @ self.basis  # (K, r)
        self.projected_t = projected.t().contiguous()  # (r, K)
        self.half_sq = 0.5 * projected.pow(2).sum(-1)  # (K,)
        self.residual = (embed.pow(2).sum(-1) - projected.pow(2).sum(-1)).clamp_min(0).sqrt()

    def __call__(self, x: Tensor) -> Tensor:
        scores = torch.addmm(-self.half_sq, x @ self.basis, self.projected_t)  # (M, K)
        candidates = scores.topk(self.candidates, dim=-1).indices  # (M, c)
        return exact_among(x, self.embed, candidates)

    def certified(self, x: Tensor) -> float:
        """Share of rows whose best of c candidates provably is the nearest code."""
        xp = x @ self.basis  # (M, r)
        xp_sq = xp.pow(2).sum(-1, keepdim=True)  # (M, 1)
        lower = torch.addmm(2 * self.half_sq, xp, self.projected_t, alpha=-2.0).add_(xp_sq)
        x_residual = (x.pow(2).sum(-1, keepdim=True) - xp_sq).clamp_min(0).sqrt()
        lower.add_((x_residual - self.residual).square())  # (M, K) lower bounds
        bounds, candidates = lower.topk(self.candidates + 1, dim=-1, largest=False)
        near = self.embed[candidates[:, :-1]]  # (M, c, D)
        best = (near - x.unsqueeze(1)).pow(2).sum(-1).min(-1).values  # (M,)
        return float((best <= bounds[:, -1] * (1 - 1e-5)).float().mean())


class IVFSearch:
    def __init__(self, embed: Tensor, cells: int, probes: int, iters: int = 10):
        self.embed, self.probes = embed, probes
        gen = torch.Generator().manual_seed(0)
        centroids = embed[torch.randperm(embed.shape[0], generator=gen)[:cells]].clone()
        for _ in range(iters):  # Lloyd on the codes themselves
            owner = torch.cdist(embed, centroids).argmin(1)
            for c in range(cells):
                if (owner == c).any():
                    centroids[c] = embed[owner == c].mean(0)
        owner = torch.cdist(embed, centroids).argmin(1)
        self.centroids_t = centroids.t().contiguous()  # (D, P)
        self.centroid_half_sq = 0.5 * centroids.pow(2).sum(-1)
        self.members = [torch.nonzero(owner == c).flatten() for c in range(cells)]
        self.members_t = [embed[m].t().contiguous() for m in self.members]  # (D, S_c)
        self.members_half_sq = [0.5 * embed[m].pow(2).sum(-1) for m in self.members]

    def __call__(self, x: Tensor) -> Tensor:
        cell_scores = torch.addmm(-self.centroid_half_sq, x, self.centroids_t)  # (M, P)
        probed = cell_scores.topk(self.probes, dim=-1).indices  # (M, p)
        best = torch.full((x.shape[0],), float("-inf"))
        codes = torch.zeros(x.shape[0], dtype=torch.long)
        for c, members in enumerate(self.members):
            rows = (probed == c).any(-1).nonzero().flatten()
            if rows.numel() == 0 or members.numel() == 0:
                continue
            scores = torch.addmm(-self.members_half_sq[c], x[rows], self.members_t[c])
            value, j = scores.max(-1)
            better = value > best[rows]
            best[rows[better]] = value[better]
            codes[rows[better]] = members[j[better]]
        return codes


def exact_among(x: Tensor, embed: Tensor, candidates: Tensor) -> Tensor:
    """x (M, D), candidates (M, c) code indices -> the exactly nearest of each row's c."""
    near = embed[candidates]  # (M, c, D)
    best = (near - x.unsqueeze(1)).pow(2).sum(-1).argmin(-1, keepdim=True)  # (M, 1)
    return candidates.gather(-1, best).squeeze(-1)


class BruteSearch:  # the exact fp32 search of the runtime (`--search float32`)
    def __init__(self, embed: Tensor):
        self.embed = embed[None]  # (1, K, D): one group

    def __call__(self, x: Tensor) -> Tensor:
        return _nearest(x[None], self.embed)[0][0]


class RuntimeSearch:  # the runtime's own searches: `--search bfloat16` and `--search pca`
    def __init__(self, codebook, kind: str):
        self.codebook, self.kind = codebook, kind

    def __call__(self, x: Tensor) -> Tensor:
        return self.codebook.encode(x, self.kind)[:, 0]


def best_ms(search, x: Tensor, repeats: int) -> tuple[float, Tensor]:
    out = search(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = search(x)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2-s")
    ap.add_argument("--devices", type=int, default=2, help="rows searched = T / devices")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = RunConfig(model=args.model)
    model_dir = resolve_model(args.model)
    astra = load_astra(ensure_artefact(config, model_dir), load_model(model_dir), model_dir)
    inputs, _, _ = build_inputs(config, model_dir)
    with torch.no_grad():
        recorded = astra.record_quant_inputs(
            lambda: astra.forward_hidden(embed_inputs(astra.model, inputs), None, None)
        )
    variants = {
        "pca-64-4": lambda e: PCASearch(e, 64, 4),
        "pca-128-2": lambda e: PCASearch(e, 128, 2),
        "pca-128-4": lambda e: PCASearch(e, 128, 4),
        "ivf-16-2": lambda e: IVFSearch(e, 16, 2),
        "ivf-32-4": lambda e: IVFSearch(e, 32, 4),
    }
    names = ["brute", "bf16", "runtime-pca", *variants]
    totals = {name: {"ms": 0.0, "same": 0, "err": 0.0} for name in names}
    brute_err, rows, certified = 0.0, 0, []
    for quantizer, parts in zip(astra.quantizers, recorded):
        for codebook, samples in zip(quantizer.codebooks, parts):
            if codebook.config.num_groups != 1:
                raise SystemExit("the alternatives are written for G=1 (the default)")
            embed = codebook.embed[0].float()  # (K, D)
            x = samples.float()[: samples.shape[0] // args.devices]  # (M, D): one sender's rows
            ms, exact = best_ms(BruteSearch(embed), x, args.repeats)
            err = (embed[exact] - x).pow(2).sum()
            brute_err, rows = brute_err + float(err), rows + x.shape[0]
            totals["brute"]["ms"] += ms
            searches = {"bf16": RuntimeSearch(codebook, "bfloat16")}
            searches["runtime-pca"] = RuntimeSearch(codebook, "pca")
            for name, build in variants.items():
                searches[name] = build(embed)
            for name, search in searches.items():
                ms, codes = best_ms(search, x, args.repeats)
                totals[name]["ms"] += ms
                totals[name]["same"] += int((codes == exact).sum())
                totals[name]["err"] += float((embed[codes] - x).pow(2).sum())
            certified.append(PCASearch(embed, 128, 4).certified(x))
    results = {
        name: {
            "ms": round(t["ms"], 1),
            "speedup_vs_brute": round(totals["brute"]["ms"] / t["ms"], 3),
            **(
                {}
                if name == "brute"
                else {
                    "recall": round(t["same"] / rows, 4),
                    "distortion": round(t["err"] / brute_err, 5),
                }
            ),
        }
        for name, t in totals.items()
    }
    results["bf16"]["native_bf16"] = native_bf16()
    out = {
        **provenance(sys.argv),
        "command": ".venv/bin/python " + " ".join(sys.argv),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rows_per_codebook": rows // sum(len(p) for p in recorded),
        "codebooks": sum(len(p) for p in recorded),
        "certified_share_bound_128_4": round(sum(certified) / len(certified), 4),
        "results": results,
    }
    path = args.out or Path(f"benchmarks/results/search_alternatives-{args.model}.json")
    write_json(path, out)
    print(f"{'search':<10} {'ms':>8} {'x brute':>8} {'recall':>7} {'distortion':>10}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['ms']:>8.1f} {r['speedup_vs_brute']:>8.2f} "
            f"{r.get('recall', 1.0):>7.4f} {r.get('distortion', 1.0):>10.5f}"
        )
    print(f"rows a first pass could certify (bound-128-4): {out['certified_share_bound_128_4']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
