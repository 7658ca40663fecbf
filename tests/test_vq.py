"""Tests for astra.vq: codebook, packing, noise-augmented quantization (all CPU, small sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from astra.vq import (
    CodebookConfig,
    GroupedCodebook,
    ResidualNoise,
    pack_codes,
    packed_num_bytes,
    table_sum,
    unpack_codes,
)


def clustered(num_points: int, dim: int, num_clusters: int, seed: int = 0, spread: float = 0.05):
    """Gaussian blobs with well separated centres: (num_points, dim), centres (C, dim)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=gen) * 3.0
    assign = torch.randint(num_clusters, (num_points,), generator=gen)
    return centres[assign] + spread * torch.randn(num_points, dim, generator=gen), centres


def quant_mse(cb: GroupedCodebook, x: torch.Tensor) -> float:
    return (cb.decode(cb.encode(x)) - x).pow(2).mean().item()


# -- config -----------------------------------------------------------------------------------


def test_config_derived_fields():
    cfg = CodebookConfig(dim=768, num_groups=32, codebook_size=1024)
    assert cfg.group_dim == 24 and cfg.bits_per_code == 10 and cfg.bits_per_token == 320
    assert CodebookConfig(dim=8, codebook_size=1000).bits_per_code == 10
    assert CodebookConfig(dim=8, codebook_size=1025).bits_per_code == 11
    assert CodebookConfig(dim=8, codebook_size=2).bits_per_code == 1
    cb = GroupedCodebook(768, 32, 1024)
    assert cb.bits_per_token == 320 and cb.bits_per_code == 10
    assert GroupedCodebook.from_config(cfg).config == cfg


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(dim=768, num_groups=5), ["num_groups=5", "dim=768", "4, 6"]),
        (dict(dim=10, num_groups=4), ["num_groups=4", "dim=10", "2, 5"]),
        (dict(dim=8, codebook_size=1), ["codebook_size=1"]),
        (dict(dim=0), ["dim=0"]),
        (dict(dim=8, num_groups=0), ["num_groups=0"]),
        (dict(dim=8, ema_decay=1.0), ["ema_decay=1.0"]),
        (dict(dim=8, eps=0.0), ["eps=0.0"]),
        (dict(dim=8, dead_code_threshold=-1.0), ["dead_code_threshold=-1.0"]),
        (dict(dim=8, commitment_weight=-0.1), ["commitment_weight=-0.1"]),
    ],
)
def test_invalid_config_names_numbers(kwargs, needles):
    with pytest.raises(ValueError) as info:
        CodebookConfig(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


# -- encode / decode --------------------------------------------------------------------------


@pytest.mark.parametrize("num_groups", [1, 4])
def test_roundtrip_eval_bit_exact(num_groups):
    torch.manual_seed(0)
    cb = GroupedCodebook(32, num_groups, 16).eval()
    x = torch.randn(3, 7, 32) * 5 + 100  # large offset: x + (x_hat - x) would round
    x_q, codes, _ = cb(x)
    assert codes.shape == (3, 7, num_groups) and codes.dtype == torch.int64
    assert torch.equal(cb.decode(cb.encode(x)), x_q)
    assert torch.equal(cb.decode(codes), x_q)


def test_roundtrip_training_with_grad_bit_exact():
    """The straight-through output equals the receiver's decode even in training."""
    torch.manual_seed(0)
    cb = GroupedCodebook(16, 2, 8)
    x = (torch.randn(40, 16) * 3 + 50).requires_grad_()
    with torch.no_grad():
        x_hat_before = cb.decode(cb.encode(x))  # forward uses the pre-update codebook
    cb.initted.fill_(True)  # skip lazy init so the codebook forward sees is the one above
    x_q, codes, _ = cb(x)
    assert torch.equal(x_q.detach(), x_hat_before)
    assert codes.dtype == torch.int64
    # The EMA step ran after quantizing: decode with the updated codebook would differ, which is
    # why the sender's x_q is what the receiver rebuilds only for a frozen (eval) codebook.
    assert not torch.equal(cb.decode(codes), x_hat_before)


def test_half_input_distances_in_float32():
    torch.manual_seed(0)
    cb = GroupedCodebook(16, 2, 8).eval()
    x = torch.randn(10, 16)
    x_q, codes, loss = cb(x.half())
    assert x_q.dtype == torch.float16 and loss.dtype == torch.float32
    assert torch.equal(codes, cb.encode(x.half().float()))
    assert torch.equal(x_q, cb.decode(codes, dtype=torch.float16))


@pytest.mark.parametrize("num_groups", [1, 3])
def test_encode_is_true_nearest(num_groups):
    torch.manual_seed(1)
    dim, size = 12, 50
    cb = GroupedCodebook(dim, num_groups, size)
    x = torch.randn(500, dim)
    codes = cb.encode(x)
    dg = dim // num_groups
    for g in range(num_groups):
        xg = x[:, g * dg : (g + 1) * dg].double()
        eg = cb.embed[g].double()
        d = torch.cdist(xg, eg) ** 2  # (N, K) brute force in float64
        chosen = d.gather(1, codes[:, g : g + 1]).squeeze(1)
        # The expansion ||x||^2 - 2xe + ||e||^2 in float32 may flip exact near-ties only.
        assert torch.all(chosen - d.min(1).values <= 1e-4 * (1 + d.min(1).values))
        assert (codes[:, g] == d.argmin(1)).float().mean() > 0.99


@pytest.mark.parametrize("num_groups", [1, 4])
def test_bfloat16_encode_is_nearly_nearest_and_decodes_symmetrically(num_groups, monkeypatch):
    import astra.vq.codebook as codebook

    torch.manual_seed(3)
    dim, size = 64, 256
    cb = GroupedCodebook(dim, num_groups, size).eval()
    x = torch.randn(2000, dim).bfloat16()
    codes = cb.encode(x)
    exact = cb.encode(x.float())  # the same inputs, float32 search
    dg = dim // num_groups
    for g in range(num_groups):
        d = torch.cdist(x[:, g * dg : (g + 1) * dg].double(), cb.embed[g].double()) ** 2
        chosen = d.gather(1, codes[:, g : g + 1]).squeeze(1)
        best = d.min(1).values
        # bf16 dot products: a code may lose to one within a few bf16 ulps of |x||e|, no more
        assert torch.all(chosen - best <= 2e-2 * (1 + best))
        assert (chosen - best).sum() <= 2e-3 * best.sum()  # total error: +0.2 % at most
    # the exact re-rank of the bf16 pass's two best candidates finds the nearest code almost
    # always; the bf16 pass alone misses it on about 1 % of these rows
    assert (codes == exact).float().mean() > 0.999
    first_pass = codebook._nearest_bf16(cb._to_groups(x, torch.bfloat16), cb.embed, rerank=1).t()
    assert (first_pass == exact).float().mean() < (codes == exact).float().mean()
    # what is sent is what is decoded, whatever the search precision
    x_q, fwd_codes, _ = cb(x)
    assert torch.equal(fwd_codes, codes) and torch.equal(x_q, cb.decode(codes, torch.bfloat16))
    monkeypatch.setattr(codebook, "_DIST_CHUNK_ELEMENTS", num_groups * size * 7)  # chunks of 7
    assert torch.equal(cb.encode(x), codes)
    # a float32 model can ask for the bf16 search (and a bf16 one for the exact search)
    assert torch.equal(cb.encode(x.float(), "bfloat16"), codes)
    assert torch.equal(cb.encode(x, "float32"), exact)
    with pytest.raises(ValueError, match=r"one of \('float32', 'bfloat16', 'pca'\), got 'float16'"):
        cb.encode(x, "float16")
    with pytest.raises(ValueError, match=r"expected last dim 64, got shape \(3, 128\)"):
        cb.encode(torch.randn(3, 128).bfloat16())


def test_encode_chunked_matches_unchunked(monkeypatch):
    import astra.vq.codebook as codebook

    torch.manual_seed(2)
    cb = GroupedCodebook(8, 2, 16)
    x = torch.randn(1000, 8)
    full = cb.encode(x)
    monkeypatch.setattr(codebook, "_DIST_CHUNK_ELEMENTS", 2 * 16 * 7)  # 7 tokens per chunk
    assert torch.equal(cb.encode(x), full)


def test_straight_through_gradient_and_commitment_loss():
    torch.manual_seed(3)
    beta = 2e-4
    cb = GroupedCodebook(8, 2, 4, commitment_weight=beta).eval()
    x = torch.randn(5, 6, 8, requires_grad=True)
    x_q, _, loss = cb(x)
    upstream = torch.randn_like(x)
    (x_q * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)  # identity Jacobian through the quantizer
    expected = beta * ((x.detach() - cb.decode(cb.encode(x))) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # the commitment gradient flows to x only (codebook is a buffer): 2 beta (x - x_hat) / numel
    x.grad = None
    loss.backward()
    x_hat = cb.decode(cb.encode(x))
    torch.testing.assert_close(x.grad, 2 * beta * (x.detach() - x_hat) / x.numel())


def test_state_dict_roundtrip():
    torch.manual_seed(4)
    cb = GroupedCodebook(8, 2, 16)
    x = torch.randn(64, 8)
    cb.kmeans_init_(x, num_iters=2)
    state = cb.state_dict()
    assert set(state) == {"embed", "cluster_size", "embed_avg", "initted"}
    fresh = GroupedCodebook(8, 2, 16)
    fresh.load_state_dict(state)
    for name, value in state.items():
        assert torch.equal(getattr(fresh, name), value)
    assert torch.equal(fresh.encode(x), cb.encode(x))


# -- K-means, EMA, dead codes -----------------------------------------------------------------


def test_kmeans_beats_random_init_on_clustered_data():
    x, _ = clustered(2000, 8, num_clusters=16, seed=5)
    trained = GroupedCodebook(8, 1, 16)
    trained.kmeans_init_(x, num_iters=10, seed=0)
    random_init = GroupedCodebook(8, 1, 16)
    random_init.kmeans_init_(x, num_iters=0, seed=0, init="random")
    mse_k, mse_r = quant_mse(trained, x), quant_mse(random_init, x)
    # seed 0 merges one pair of blobs (a k-means local minimum): still ~17x better
    assert mse_k < 0.1 * mse_r, (mse_k, mse_r)
    assert bool(trained.initted)
    assert torch.isclose(trained.cluster_size.sum(), torch.tensor(2000.0))
    # Lloyd alone (from the same random seeds) also lowers the error
    lloyd = GroupedCodebook(8, 1, 16)
    lloyd.kmeans_init_(x, num_iters=10, seed=0, init="random")
    assert quant_mse(lloyd, x) <= mse_r


def test_kmeans_per_group_and_deterministic():
    x, _ = clustered(600, 8, num_clusters=6, seed=6)
    a, b = GroupedCodebook(8, 2, 8), GroupedCodebook(8, 2, 8)
    a.kmeans_init_(x, num_iters=5, seed=3)
    b.kmeans_init_(x, num_iters=5, seed=3)
    assert torch.equal(a.embed, b.embed)


def test_kmeans_fewer_samples_than_codes_warns():
    x = torch.randn(5, 4)
    cb = GroupedCodebook(4, 1, 16)
    with pytest.warns(UserWarning, match="N=5"):
        cb.kmeans_init_(x)
    assert quant_mse(cb, x) == 0.0  # every sample is a code


def test_lazy_kmeans_init_runs_once():
    x, _ = clustered(400, 8, num_clusters=8, seed=7)
    cb = GroupedCodebook(8, 1, 8, dead_code_threshold=0.0).train()
    calls = []
    original = cb.kmeans_init_
    cb.kmeans_init_ = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    cb(x)
    cb(x)
    assert len(calls) == 1 and bool(cb.initted)
    cb.eval()
    before = cb.embed.clone()
    cb(x)
    assert len(calls) == 1 and torch.equal(cb.embed, before)


def test_ema_moves_toward_data_and_not_in_eval():
    torch.manual_seed(8)
    cb = GroupedCodebook(4, 1, 2, ema_decay=0.9, dead_code_threshold=0.0)
    cb.embed.copy_(torch.tensor([[[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]]))
    cb.embed_avg.copy_(cb.embed)
    cb.initted.fill_(True)
    target = torch.tensor([2.0, 1.0, 0.0, 0.0])
    x = target + 0.01 * torch.randn(256, 4)  # all nearest to code 0
    cb.eval()
    cb(x)
    assert torch.equal(cb.embed[0, 0], torch.tensor([1.0, 0, 0, 0]))
    cb.train()
    cb(x, update=False)  # explicit opt-out in training
    assert torch.equal(cb.embed[0, 0], torch.tensor([1.0, 0, 0, 0]))
    dist0 = (cb.embed[0, 0] - target).norm()
    for _ in range(30):
        cb(x)
    assert (cb.embed[0, 0] - target).norm() < 0.1 * dist0
    # an unused code only drifts by the Laplace smoothing (eps=1e-5 relative)
    torch.testing.assert_close(cb.embed[0, 1], torch.tensor([-1.0, 0, 0, 0]), rtol=0, atol=1e-3)


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(9)
    x, _ = clustered(512, 4, num_clusters=4, seed=9)
    cb = GroupedCodebook(4, 1, 8, ema_decay=0.5, dead_code_threshold=0.5)
    cb.kmeans_init_(x, num_iters=5)
    far = torch.full((4,), 1e3)
    cb.embed[0, :4] = far  # 4 codes nobody will ever pick
    cb.embed_avg[0, :4] = far
    cb.cluster_size[0, :4] = 1.0
    cb.train()
    for _ in range(3):
        cb(x)
    assert (cb.embed[0, :4] - far).abs().min() > 100  # restarted onto data
    assert cb.embed.abs().max() < 50
    used = torch.unique(cb.encode(x)).numel()
    assert used > 4  # the revived codes now take tokens


# -- lookup-table fast path -------------------------------------------------------------------


@pytest.mark.parametrize("num_groups", [1, 4])
def test_lookup_table_equals_decode_then_linear(num_groups):
    torch.manual_seed(10)
    cb = GroupedCodebook(32, num_groups, 16)
    linear = torch.nn.Linear(32, 24)
    codes = torch.randint(16, (3, 5, num_groups))
    ref = linear(cb.decode(codes))
    table = cb.lookup_table(linear.weight, linear.bias)
    assert table.shape == (num_groups, 16, 24)
    # float32, |values| ~ 1: reassociated sums differ by a few ulps
    torch.testing.assert_close(table_sum(table, codes), ref, rtol=0, atol=1e-5)
    no_bias = table_sum(cb.lookup_table(linear.weight), codes)
    torch.testing.assert_close(no_bias, cb.decode(codes) @ linear.weight.T, rtol=0, atol=1e-5)
    assert table_sum(table, codes[:0]).shape == (0, 5, 24)


# -- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 8, 10, 16])
@pytest.mark.parametrize(("num_tokens", "num_groups"), [(0, 4), (1, 1), (7, 3), (97, 32)])
def test_pack_roundtrip_and_exact_size(bits, num_tokens, num_groups):
    gen = torch.Generator().manual_seed(bits * 1000 + num_tokens)
    codes = torch.randint(1 << bits, (num_tokens, num_groups), generator=gen)
    buf = pack_codes(codes, bits)
    expected = math.ceil(num_tokens * num_groups * bits / 8)
    assert buf.dtype == torch.uint8 and buf.shape == (expected,)
    assert packed_num_bytes(num_tokens, num_groups, bits) == expected
    out = unpack_codes(buf, num_tokens, num_groups, bits)
    assert out.dtype == torch.int64 and torch.equal(out, codes)


def test_pack_bit_order_little_endian():
    codes = torch.tensor([[0b1100000001, 0b0000000011]])  # two 10-bit codes
    buf = pack_codes(codes, 10)
    # code 0 bits 0..7 -> byte 0; bits 8,9 -> byte 1 bits 0,1; code 1 bits 0..5 -> byte 1 bits 2..7
    assert buf.tolist() == [0b00000001, 0b00001111, 0b00000000]
    assert torch.equal(pack_codes(torch.tensor([[1, 0, 1, 1]]), 1), torch.tensor([0b1101]).byte())


def test_pack_all_int_dtypes():
    codes = torch.randint(200, (9, 2))
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_codes(codes.to(dtype), 8), pack_codes(codes, 8))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"code value 1024 .*bits=10"):
        pack_codes(torch.tensor([[3, 1024]]), 10)
    with pytest.raises(ValueError, match=r"code value -1"):
        pack_codes(torch.tensor([[-1, 2]]), 10)
    with pytest.raises(ValueError, match="bits=0"):
        pack_codes(torch.zeros(2, 2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="bits=17"):
        pack_codes(torch.zeros(2, 2, dtype=torch.long), 17)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="4 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 3, 5)


def test_codebook_codes_through_the_wire():
    torch.manual_seed(11)
    cb = GroupedCodebook(16, 4, 1000).eval()  # K=1000: 10 bits, not a power of two
    x = torch.randn(33, 16)
    x_q, codes, _ = cb(x)
    buf = pack_codes(codes, cb.bits_per_code)
    assert buf.numel() == math.ceil(33 * cb.bits_per_token / 8)
    assert torch.equal(cb.decode(unpack_codes(buf, 33, 4, cb.bits_per_code)), x_q)


# -- noise-augmented quantization -------------------------------------------------------------


def correlated_gaussian(num: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    cov = a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)
    mean = torch.linspace(-1, 1, dim, dtype=torch.float64)
    z = torch.randn(num, dim, generator=gen, dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T, mean, cov


@pytest.mark.parametrize("num_groups", [1, 2])
def test_noise_fit_matches_empirical_and_streams(num_groups):
    dim = 8
    x, _, _ = correlated_gaussian(20_000, dim, seed=12)
    noise = ResidualNoise(dim, num_groups)
    for chunk in x.split(3000):  # streaming == one shot
        noise.accumulate_(chunk)
    noise.finalize_()
    dg = dim // num_groups
    for g in range(num_groups):
        xg = x[:, g * dg : (g + 1) * dg]
        # float32 buffers: empirical stats reproduced to ~1e-6 relative
        torch.testing.assert_close(noise.mean[g].double(), xg.mean(0), rtol=0, atol=1e-5)
        cov_g = torch.cov(xg.T)
        torch.testing.assert_close(noise.covariance[g].double(), cov_g, rtol=0, atol=1e-5)
    assert torch.allclose(torch.tril(noise.scale), noise.scale)  # Cholesky factor


def test_noise_samples_follow_the_fitted_gaussian():
    dim = 6
    x, mean, cov = correlated_gaussian(20_000, dim, seed=13)
    noise = ResidualNoise(dim).fit_(x)
    # sampling error of 2e4 draws: std of a mean ~ sqrt(var / n) < 0.01; 5 sigma = 0.05
    torch.testing.assert_close(noise.mean.double()[0], mean, rtol=0, atol=0.05)
    torch.testing.assert_close(noise.covariance.double()[0], cov, rtol=0, atol=0.05)
    xi = noise.sample((20_000, dim), generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(xi.mean(0), mean, rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(xi.T), cov, rtol=0, atol=0.05)
    diag = ResidualNoise(dim, diagonal=True).fit_(x)
    torch.testing.assert_close(
        diag.covariance.double()[0], torch.diag(cov.diag()), rtol=0, atol=0.05
    )


def test_noise_singular_covariance_still_factors():
    x = torch.randn(100, 1).repeat(1, 4)  # rank-1 residuals
    noise = ResidualNoise(4).fit_(x)
    assert torch.isfinite(noise.scale).all()
    torch.testing.assert_close(noise.covariance[0], torch.cov(x.T), rtol=0, atol=1e-3)


def test_noise_only_in_training():
    noise = ResidualNoise(8, 2).fit_(torch.randn(500, 8))
    x_hat = torch.randn(4, 3, 8, requires_grad=True)
    noise.eval()
    assert noise.apply(x_hat, 1.0) is x_hat  # NAQ is off at inference
    noise.train()
    assert noise.apply(x_hat, 0.0) is x_hat
    noisy = noise.apply(x_hat, 1.0)
    assert noisy.shape == x_hat.shape and not torch.equal(noisy, x_hat)
    noisy.sum().backward()
    assert torch.equal(x_hat.grad, torch.ones_like(x_hat))
    with pytest.raises(RuntimeError, match="before fit"):
        ResidualNoise(8).train().apply(x_hat, 1.0)
    with pytest.raises(ValueError, match="lam=-0.5"):
        noise.apply(x_hat, -0.5)
    assert set(noise.state_dict()) == {"mean", "scale", "fitted"}


def test_seeding_many_codebooks_at_once_seeds_each_from_its_own_samples():
    """seed_codebooks: one batched k-means++ for codebooks of one shape; every seed is a sample
    of its own codebook's group, and the fitted error matches per-codebook seeding."""
    from astra.vq.codebook import seed_codebooks

    torch.manual_seed(0)
    books = [GroupedCodebook(16, 4, 32) for _ in range(3)] + [GroupedCodebook(8, 1, 32)]
    samples = [torch.randn(400, 16) * (i + 1) for i in range(3)] + [torch.randn(20, 8)]
    seeds = seed_codebooks(books, samples, seed=1)
    assert seeds[3] is None  # fewer samples than codes: kmeans_init_ handles it alone
    errors = {}
    for i in range(3):
        groups = books[i]._to_groups(samples[i])  # (G, N, Dg)
        assert seeds[i].shape == (4, 32, 4)
        # every seed is one of its own group's samples (k-means++ draws data points)
        match = (seeds[i][:, :, None, :] == groups[:, None, :, :]).all(-1).any(-1)
        assert match.all()
        for label, s in (("batched", seeds[i]), ("own", None)):
            cb = GroupedCodebook(16, 4, 32)
            cb.kmeans_init_(samples[i], num_iters=3, seed=1, seeds=s)
            residual = samples[i] - cb.decode(cb.encode(samples[i]))
            errors[i, label] = float(residual.square().sum() / samples[i].square().sum())
        assert errors[i, "batched"] == pytest.approx(errors[i, "own"], rel=0.1)


# -- calibration speed: blocked search, pruned Lloyd, seeding in rounds -------------------------


@pytest.mark.parametrize("block", [7 * 5, 64 * 2 * 5, 1 << 18])
def test_blocked_nearest_matches_dense_including_ties(monkeypatch, block):
    """_nearest_two (blocks over groups and rows, reduced per block) picks exactly the codes of
    the dense search, ties included (small integers: exact distances, many ties -> first index),
    and its second distance is the dense second smallest."""
    import astra.vq.codebook as codebook

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (3, 301, 2), generator=gen).float()  # (G, M, Dg)
    embed = torch.randint(-2, 3, (3, 5, 2), generator=gen).float()  # duplicate codes too
    dense = ((x.unsqueeze(2) - embed.unsqueeze(1)) ** 2).sum(-1)  # (G, M, K), exact
    monkeypatch.setattr(codebook, "_BLOCK_ELEMENTS", block)
    codes, best, second = codebook._nearest_two(x, embed)
    assert torch.equal(codes, dense.argmin(-1))  # argmin: first index on ties
    assert torch.equal(codes, codebook._nearest(x, embed)[0])
    top2 = dense.sort(-1).values
    assert torch.equal(best, top2[..., 0]) and torch.equal(second, top2[..., 1])
    assert (top2[..., 0] == top2[..., 1]).any()  # the data really has ties


@pytest.mark.parametrize("num_groups", [1, 4])
def test_pruned_lloyd_as_good_as_dense_lloyd_and_codes_nearest(num_groups):
    """lloyd skips searches by the triangle inequality: the error of plain Lloyd from the same
    seeds, and the codes it returns are the nearest codes of its centres."""
    from astra.vq.codebook import _nearest, lloyd, lloyd_dense

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_groups, 3000, 3, generator=gen)
    seeds = x[:, torch.randperm(3000, generator=gen)[:300]]  # (G, K, Dg)
    centers, codes, dists = lloyd(x, seeds, 8)
    _, ref_codes, ref_dists = lloyd_dense(x, seeds, 8)
    torch.testing.assert_close(dists.sum(), ref_dists.sum(), rtol=2e-3, atol=0)
    assert (codes == ref_codes).float().mean() > 0.95  # the same clustering, bar a few
    nearest, nearest_dists = _nearest(x, centers)
    # the search counts distances within 2^-13 (relative) as ties: the lower code wins
    assert (codes == nearest).float().mean() > 0.999
    torch.testing.assert_close(dists, nearest_dists, rtol=3e-4, atol=1e-6)


def test_kmeans_init_returns_the_codes_encode_gives():
    x, _ = clustered(3000, 8, num_clusters=40, seed=8, spread=0.5)
    cb = GroupedCodebook(8, 2, 64)
    codes = cb.kmeans_init_(x, num_iters=5, seed=0)
    assert (codes == cb.encode(x)).float().mean() > 0.999
    assert torch.equal(cb.cluster_size.sum(-1), torch.full((2,), 3000.0))


def test_seeding_in_rounds_then_pruned_lloyd_as_good_as_old_path():
    """New calibration path (k-means++ in 32 rounds + pruned Lloyd) against the old one
    (one-at-a-time k-means++ + plain Lloyd) on the same data: no more than 5 % more error."""
    from astra.vq.codebook import _kmeans_plus_plus, kmeans_plus_plus_rounds, lloyd, lloyd_dense

    gen = torch.Generator().manual_seed(2)
    blobs = torch.randn(64, 6, generator=gen) * 2.0  # an uneven mixture, like activations
    weights = torch.rand(64, generator=gen) ** 3
    pick = torch.multinomial(weights, 4096, replacement=True, generator=gen)
    x = (blobs[pick] + 0.4 * torch.randn(4096, 6, generator=gen)).reshape(1, 4096, 6)
    total = x.square().sum()
    old = lloyd_dense(x, _kmeans_plus_plus(x, 256, torch.Generator().manual_seed(0)), 10)
    new = lloyd(x, kmeans_plus_plus_rounds(x, 256, torch.Generator().manual_seed(0)), 10)
    old_error, new_error = old[2].sum() / total, new[2].sum() / total
    assert new_error <= 1.05 * old_error, (float(new_error), float(old_error))


def test_pca_search_finds_the_nearest_code_on_almost_every_row_and_follows_the_codebook():
    """The "pca" first pass (a third of the dimensions, four candidates re-ranked exactly):
    on activations with a decaying spectrum, as a Transformer's are, it returns the exact
    nearest code on nearly every row and never a far one; it rebuilds its tables when the
    codebook changes; groups too narrow for it search exactly."""
    gen = torch.Generator().manual_seed(0)
    dim, size = 96, 256
    scales = torch.logspace(0, -1.5, dim)  # (D,): a few wide directions, many narrow ones
    cb = GroupedCodebook(dim, num_groups=1, codebook_size=size)
    cb.embed.copy_(torch.randn(1, size, dim, generator=gen) * scales)
    x = cb.embed[0, torch.randint(size, (2000,), generator=gen)]
    x = x + 0.3 * torch.randn(2000, dim, generator=gen) * scales  # (M, D): near some code
    exact, found = cb.encode(x, "float32")[:, 0], cb.encode(x, "pca")[:, 0]
    assert (found == exact).float().mean() > 0.99
    err = lambda codes: (cb.embed[0, codes] - x).pow(2).sum(-1)  # noqa: E731
    assert torch.all(err(found) <= err(exact) * 1.5)  # a miss is a near-tie, never a far code
    # the sender's codes are what the receiver decodes, whichever search picked them
    assert torch.equal(cb.decode(found[:, None]), cb.embed[0, found])
    # a new codebook (EMA step, K-means, a loaded state) gets new tables, not the old ones
    cb.embed.copy_(torch.randn(1, size, dim, generator=gen) * scales)
    exact, found = cb.encode(x, "float32")[:, 0], cb.encode(x, "pca")[:, 0]
    assert (found == exact).float().mean() > 0.95
    cb.embed = torch.randn(1, size, dim, generator=gen) * scales  # a new tensor, not an edit
    exact, found = cb.encode(x, "float32")[:, 0], cb.encode(x, "pca")[:, 0]
    assert (found == exact).float().mean() > 0.95
    with torch.inference_mode():  # a codebook loaded for inference only: no version counter
        frozen = GroupedCodebook(dim, num_groups=1, codebook_size=size)
        frozen.embed.copy_(cb.embed)
        assert torch.equal(frozen.encode(x, "pca"), cb.encode(x, "pca"))
    # under MIN_PCA_DIM wide, the exact search
    narrow = GroupedCodebook(dim, num_groups=4, codebook_size=size)  # groups of 24
    narrow.embed.copy_(torch.randn(4, size, dim // 4, generator=gen))
    assert torch.equal(narrow.encode(x, "pca"), narrow.encode(x, "float32"))
