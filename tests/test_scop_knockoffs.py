"""SCOP knockoff generators (passes/scop_knockoffs.py): the output contract, each generator's
statistical claim, label-blindness by construction, and the make_knockoff factory."""
import inspect

import pytest
import torch
from torch import nn

from fxprune.errors import ConfigError
from fxprune.passes.scop_knockoffs import (
    CallableKnockoff,
    GaussianKnockoff,
    GeneratorKnockoff,
    KnockoffGenerator,
    KnockoffNotFittedError,
    NoiseKnockoff,
    ShuffleKnockoff,
    make_knockoff,
    tanh_to_normalized,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=16, c=3, h=8, w=8, seed=1, dtype=torch.float32):
    return torch.randn(b, c, h, w, generator=gen(seed)).to(dtype)


class TinyG(nn.Module):
    """DCGAN-shaped stand-in: z [B, z] -> tanh output [B, 3, 4, 4] in [-1, 1]."""

    def __init__(self, z_dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(z_dim, 3 * 4 * 4)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 4, 4)


def fitted_gaussian(x=None):
    return GaussianKnockoff(grid=4).fit(images(64, seed=7) if x is None else x)


def all_generators():
    return {
        "shuffle": ShuffleKnockoff(),
        "shuffle-derangement": ShuffleKnockoff(derangement=True),
        "gaussian": fitted_gaussian(),
        "noise": NoiseKnockoff(),
        "noise-fitted": NoiseKnockoff().fit(images(32, seed=3)),
        "generator": GeneratorKnockoff(TinyG(), 6, normalize=tanh_to_normalized([0.5] * 3, [0.25] * 3)),
    }


# ---------------------------------------------------------------------------------------------
# contract: shape / dtype / device, determinism, no labels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(all_generators()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device_preserved(name, dtype):
    g = all_generators()[name]
    for shape in [(16, 3, 8, 8), (5, 3, 12, 10), (1, 3, 8, 8)]:
        x = torch.randn(*shape, generator=gen(2)).to(dtype)
        y = g(x, gen(0))
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", list(all_generators()))
def test_same_generator_state_same_knockoffs(name):
    g = all_generators()[name]
    x = images()
    a, b, c = g(x, gen(5)), g(x, gen(5)), g(x, gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the generator is advanced: two calls from one stream differ
    stream = gen(5)
    assert not torch.equal(g(x, stream), g(x, stream))


@pytest.mark.parametrize("name", list(all_generators()))
def test_no_label_argument_and_label_blind(name):
    """X~ independent of Y given X by construction: the call takes (x, generator) only, so two
    batches with the same images and different labels get identical knockoffs for the same seed."""
    g = all_generators()[name]
    params = list(inspect.signature(g.__call__).parameters)
    assert params == ["x", "generator"]
    x = images()
    batch1 = (x, torch.zeros(16, dtype=torch.long))
    batch2 = (x.clone(), torch.arange(16) % 10)
    assert not torch.equal(batch1[1], batch2[1])
    assert torch.equal(g(batch1[0], gen(3)), g(batch2[0], gen(3)))


def test_rejects_non_image_input():
    with pytest.raises(ConfigError, match=r"\[B, C, H, W\]"):
        ShuffleKnockoff()(torch.randn(4, 3), gen())
    with pytest.raises(ConfigError, match="floating-point"):
        NoiseKnockoff()(torch.ones(2, 3, 4, 4, dtype=torch.long), gen())


# ---------------------------------------------------------------------------------------------
# shuffle
# ---------------------------------------------------------------------------------------------

def test_shuffle_is_a_permutation_of_the_batch():
    b = 16
    x = images(b) + 100.0 * torch.arange(b).view(b, 1, 1, 1)  # rows are easy to tell apart
    y = ShuffleKnockoff()(x, gen(0))
    rows_x = x.reshape(b, -1)
    rows_y = y.reshape(b, -1)
    # each output row is exactly one input row, and every input row is used once
    match = (rows_y[:, None, :] == rows_x[None, :, :]).all(-1)
    assert match.sum(1).eq(1).all()
    assert match.sum(0).eq(1).all()
    idx = match.float().argmax(1)
    assert sorted(idx.tolist()) == list(range(b))
    assert idx.tolist() != list(range(b))  # not the identity (seed 0, B = 16)
    # and it is the permutation the generator advertises
    assert idx.tolist() == ShuffleKnockoff().permutation(b, gen(0)).tolist()


def test_shuffle_not_identity_with_high_probability():
    x = images(8)
    identical = sum(torch.equal(ShuffleKnockoff()(x, gen(s)), x) for s in range(50))
    assert identical <= 1  # P(identity) = 1/8! per draw


def test_shuffle_derangement_has_no_fixed_points():
    b = 12
    for s in range(20):
        perm = ShuffleKnockoff(derangement=True).permutation(b, gen(s))
        assert sorted(perm.tolist()) == list(range(b))
        assert (perm != torch.arange(b)).all()
    # plain randperm (the MindSpore port) does have fixed points sometimes
    fixed = sum(int((ShuffleKnockoff().permutation(b, gen(s)) == torch.arange(b)).sum()) for s in range(20))
    assert fixed > 0
    x = images(1)
    assert torch.equal(ShuffleKnockoff(derangement=True)(x, gen()), x)  # B = 1: nothing to swap with


# ---------------------------------------------------------------------------------------------
# gaussian
# ---------------------------------------------------------------------------------------------

C, GRID, HW, N = 2, 4, 8, 4000  # p = 2 * 4 * 4 = 32, 2x2-pixel blocks


def known_gaussian_images(n=N, seed=0):
    """Images whose 2x2 block means are N(mu, Sigma) with a known correlated Sigma, plus a
    within-block pattern with zero block mean (which the knockoff must keep)."""
    p = C * GRID * GRID
    idx = torch.arange(p, dtype=torch.float64)
    R = 0.6 ** (idx[:, None] - idx[None, :]).abs()                   # AR(1), lambda_min ~ 0.25
    sd = 0.5 + 1.5 * torch.rand(p, generator=gen(10), dtype=torch.float64)
    sigma = sd[:, None] * R * sd[None, :]
    mu = torch.randn(p, generator=gen(11), dtype=torch.float64)
    z = torch.randn(n, p, generator=gen(seed), dtype=torch.float64)
    low = mu + z @ torch.linalg.cholesky(sigma).T
    x = low.view(n, C, GRID, GRID).repeat_interleave(2, 2).repeat_interleave(2, 3)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(GRID, GRID)
    amp = torch.rand(n, C, 1, 1, generator=gen(seed + 1), dtype=torch.float64)
    x = x + 0.3 * amp * checker
    return x.float(), low, mu, sigma


def pooled(x):
    return x.double().view(x.shape[0], C, GRID, 2, GRID, 2).mean((3, 5)).reshape(x.shape[0], -1)


def cov(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return a.T @ b / (a.shape[0] - 1)


def second_order_report(x_low, k_low, sigma, D):
    """Errors, on the correlation scale of the known Sigma, of the knockoff's first two moments
    (against the data's) and of the cross-covariance Cov(X, X~) (against Cov(X) - D, D from the
    construction: off the diagonal X~ must correlate with X exactly as X does with itself)."""
    sd = sigma.diagonal().sqrt()
    norm = sd[:, None] * sd[None, :]
    off = ~torch.eye(sigma.shape[0], dtype=torch.bool)
    cross = cov(x_low, k_low) / norm
    target_cross = (cov(x_low, x_low) - torch.diag(D)) / norm
    return {
        "mean": float(((k_low.mean(0) - x_low.mean(0)) / sd).abs().max()),
        "cov": float(((cov(k_low, k_low) - cov(x_low, x_low)) / norm).abs().mean()),
        "cov_max": float(((cov(k_low, k_low) - cov(x_low, x_low)) / norm).abs().max()),
        "cross_off": float((cross - target_cross)[off].abs().mean()),
        "cross_off_max": float((cross - target_cross)[off].abs().max()),
        "cross_diag": float((cross.diagonal() - target_cross.diagonal()).abs().max()),
    }


def assert_second_order_knockoff(rep):
    assert rep["mean"] < 0.1, rep
    assert rep["cov"] < 0.025 and rep["cov_max"] < 0.12, rep
    assert rep["cross_off"] < 0.02 and rep["cross_off_max"] < 0.1, rep
    assert rep["cross_diag"] < 0.08, rep


def test_gaussian_knockoffs_match_moments_and_swap_property():
    x, low, mu, sigma = known_gaussian_images()
    k = GaussianKnockoff(grid=GRID).fit(x.split(500))
    assert k.p == 32 and k.n_fit == N
    # the fit recovers the model (shrinkage 'auto' is small with n >> p)
    assert 0.0 <= k.shrinkage_used < 0.05
    sd = sigma.diagonal().sqrt()
    assert ((k.sigma - sigma) / (sd[:, None] * sd[None, :])).abs().max() < 0.1
    # equicorrelated s on the correlation scale: min(1, 2 lambda_min(R)) * safety, D = s * sigma^2
    R = k.sigma / k.sigma.diagonal().sqrt()[:, None] / k.sigma.diagonal().sqrt()[None, :]
    s = 0.999 * min(1.0, 2 * float(torch.linalg.eigvalsh(R)[0]))
    assert torch.allclose(k.s, torch.full_like(k.s, s))
    assert 0.3 < s < 0.7  # AR(1) with rho 0.6: lambda_min ~ 0.25
    assert torch.allclose(k.D, k.s * k.sigma.diagonal())

    xk = k(x, gen(2024))  # not gen(0): that stream drew the data itself
    # within-block detail is kept: X~ - X is constant within each 2x2 block
    d = (xk - x).double()
    assert torch.allclose(d, pooled(d).view(-1, C, GRID, GRID).repeat_interleave(2, 2).repeat_interleave(2, 3),
                          atol=1e-5)
    x_low, k_low = pooled(x), pooled(xk)
    assert torch.allclose(x_low, low, atol=1e-5)

    rep = second_order_report(x_low, k_low, sigma, k.D)
    assert_second_order_knockoff(rep)
    # knockoffs are not copies: corr(X_j, X~_j) = 1 - s_j ~ 0.5
    assert (torch.diagonal(cov(x_low, k_low)) / sigma.diagonal()).max() < 0.75

    # joint swap-exchangeability at second order: Cov((X, X~)_swap(S)) = Cov((X, X~)) for any S
    p = k.p
    joint = torch.cat([x_low, k_low], 1)
    g_full = cov(joint, joint)
    scale = torch.cat([sd, sd])
    scale = scale[:, None] * scale[None, :]
    for seed in range(3):
        S = torch.rand(p, generator=gen(100 + seed)) < 0.5
        order = torch.arange(2 * p)
        order[:p][S], order[p:][S] = order[p:][S], order[:p][S]
        swapped = joint[:, order]
        assert ((cov(swapped, swapped) - g_full) / scale).abs().max() < 0.15


def test_second_order_checks_can_fail():
    """The checks above reject the obvious non-knockoffs: a copy of X (cross diagonal wrong), an
    independent draw from N(mu, Sigma) (cross off-diagonal wrong) and independent noise with the
    right variances but no correlations (covariance wrong)."""
    x, low, mu, sigma = known_gaussian_images()
    k = GaussianKnockoff(grid=GRID).fit(x)
    x_low = pooled(x)
    copy_rep = second_order_report(x_low, x_low.clone(), sigma, k.D)
    assert copy_rep["cross_diag"] > 0.3
    with pytest.raises(AssertionError):
        assert_second_order_knockoff(copy_rep)
    _, indep_low, _, _ = known_gaussian_images(seed=99)
    indep_rep = second_order_report(x_low, indep_low, sigma, k.D)
    assert indep_rep["cross_off_max"] > 0.3
    with pytest.raises(AssertionError):
        assert_second_order_knockoff(indep_rep)
    noise_low = mu + sigma.diagonal().sqrt() * torch.randn(N, mu.numel(), generator=gen(5), dtype=torch.float64)
    noise_rep = second_order_report(x_low, noise_low, sigma, k.D)
    assert noise_rep["cov"] > 0.05 and noise_rep["cov_max"] > 0.5
    with pytest.raises(AssertionError):
        assert_second_order_knockoff(noise_rep)


def test_gaussian_error_before_fit_and_bad_fits():
    k = GaussianKnockoff()
    assert not k.fitted
    with pytest.raises(KnockoffNotFittedError, match="fit"):
        k(images(), gen())
    with pytest.raises(ConfigError, match="singular"):
        GaussianKnockoff(grid=4, shrinkage=0.0).fit(images(8))  # n = 8 < p = 48
    with pytest.raises(ConfigError, match="channels"):
        fitted_gaussian()(images(c=2), gen())
    with pytest.raises(ConfigError, match="shrinkage"):
        GaussianKnockoff(shrinkage="lots")


def test_gaussian_fit_inputs_block_and_shrinkage():
    x = images(64, h=16, w=16, seed=4)
    y = torch.randint(0, 10, (64,))
    # (x, y) batches (labels dropped), a tensor, fit_data in the constructor: same statistics
    a = GaussianKnockoff(block=4).fit([(x[:32], y[:32]), (x[32:], y[32:])])
    b = GaussianKnockoff(grid=4).fit(x)
    c = GaussianKnockoff(grid=(4, 4), fit_data=x.split(16))
    assert a.grid == (4, 4) and a.p == 48
    assert torch.allclose(a.sigma, b.sigma) and torch.allclose(b.sigma, c.sigma)
    assert torch.equal(a(x, gen(1)), b(x, gen(1)))
    # few samples: 'auto' shrinks strongly and the fit still works; a fixed value is honoured
    small = GaussianKnockoff(grid=4).fit(x[:20])
    assert small.shrinkage_used > 0.3 and small.fitted
    assert GaussianKnockoff(grid=4, shrinkage=0.2).fit(x).shrinkage_used == 0.2
    # image sizes that do not divide by the grid pool onto the same grid
    assert b(images(3, h=10, w=7), gen()).shape == (3, 3, 10, 7)
    assert "p=48" in repr(b) and "unfitted" in repr(GaussianKnockoff())


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------

def test_noise_matches_per_channel_mean_and_std():
    mean = torch.tensor([-1.0, 0.0, 2.0]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    x = mean + std * torch.randn(64, 3, 16, 16, generator=gen(1))
    y = NoiseKnockoff()(x, gen(0))
    assert torch.allclose(y.mean((0, 2, 3)), x.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(y.std((0, 2, 3)), x.std((0, 2, 3)), rtol=0.03)
    # fitted statistics are used instead of the batch's
    other = 5.0 + 0.1 * torch.randn(32, 3, 8, 8, generator=gen(2))
    nk = NoiseKnockoff().fit([(other, torch.zeros(32))])
    y2 = nk(x, gen(0))
    assert torch.allclose(y2.mean((0, 2, 3)), torch.full((3,), 5.0), atol=0.02)
    assert torch.allclose(y2.std((0, 2, 3)), torch.full((3,), 0.1), rtol=0.05)
    fixed = NoiseKnockoff(mean=[1, 2, 3], std=[0, 0, 0])(x, gen())
    assert torch.equal(fixed, torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand_as(x))
    with pytest.raises(ConfigError, match="both"):
        NoiseKnockoff(mean=[0.0])


# ---------------------------------------------------------------------------------------------
# user-supplied generator network
# ---------------------------------------------------------------------------------------------

def test_generator_knockoff_resizes_normalises_and_is_seeded():
    G = TinyG()
    x = images(5, h=8, w=8)
    raw = GeneratorKnockoff(G, 6)(x, gen(0))
    assert raw.shape == x.shape and raw.abs().max() <= 1.0  # tanh range, not normalised
    z = torch.randn(5, 6, generator=gen(0))
    expect = torch.nn.functional.interpolate(G(z).detach(), size=(8, 8), mode="nearest")
    assert torch.allclose(raw, expect)
    norm = GeneratorKnockoff(G, 6, normalize=tanh_to_normalized([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))(x, gen(0))
    assert torch.allclose(norm, ((raw + 1) / 2 - 0.5) / 0.25, atol=1e-6)
    # X~ ignores the pixels of X (unconditional generator)
    assert torch.equal(GeneratorKnockoff(G, 6)(x * 3 + 1, gen(0)), raw)
    # tuple z shapes and shape errors
    conv_g = nn.Sequential(nn.ConvTranspose2d(4, 3, 4), nn.Tanh())  # z [B, 4, 1, 1] -> [B, 3, 4, 4]
    assert GeneratorKnockoff(conv_g, (4, 1, 1))(x, gen()).shape == x.shape
    with pytest.raises(ConfigError, match="channels"):
        GeneratorKnockoff(G, 6)(images(c=1), gen())
    assert not any(p.grad is not None for p in G.parameters())


# ---------------------------------------------------------------------------------------------
# make_knockoff
# ---------------------------------------------------------------------------------------------

def test_make_knockoff_names_objects_and_callables():
    assert isinstance(make_knockoff("shuffle"), ShuffleKnockoff)
    assert isinstance(make_knockoff(None), ShuffleKnockoff)
    assert isinstance(make_knockoff(" Gaussian "), GaussianKnockoff)
    assert isinstance(make_knockoff("noise"), NoiseKnockoff)
    gk = GeneratorKnockoff(TinyG(), 6)
    assert make_knockoff(gk) is gk
    fitted = fitted_gaussian()
    assert make_knockoff(fitted) is fitted
    assert all(isinstance(make_knockoff(n), KnockoffGenerator) for n in ("shuffle", "gaussian", "noise"))

    def flip(x, generator):
        return x.flip(0)

    wrapped = make_knockoff(flip)
    assert isinstance(wrapped, CallableKnockoff)
    x = images()
    assert torch.equal(wrapped(x, gen()), x.flip(0))


def test_make_knockoff_errors():
    with pytest.raises(ConfigError) as e:
        make_knockoff("gan")
    for name in ("'shuffle'", "'gaussian'", "'noise'", "GeneratorKnockoff"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="GeneratorKnockoff"):
        make_knockoff("generator")
    with pytest.raises(ConfigError, match="GeneratorKnockoff"):
        make_knockoff(TinyG())
    with pytest.raises(ConfigError, match=r"\(x, generator\)"):
        make_knockoff(lambda x: x)
    with pytest.raises(ConfigError, match="shape/dtype/device"):
        make_knockoff(lambda x, g: x[:1])(images(), gen())
    with pytest.raises(ConfigError, match="shape/dtype/device"):
        make_knockoff(lambda x, g: x.double())(images(), gen())
    with pytest.raises(ConfigError):
        make_knockoff(3)
