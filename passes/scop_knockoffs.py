"""Knockoff data for SCOP (Tang et al., NeurIPS 2020): the "control group" a network is compared on.

SCOP learns, per filter, how much the network relies on that filter's response to real data X
versus to knockoff data X~ (ALGORITHMS.md section 2). Definition 1 of the paper asks two things of X~:

1. **Swap-exchangeability**: swapping any subset S of features between X and X~ leaves the joint
   distribution of (X, X~) unchanged.
2. **X~ independent of Y given X**: the knockoff carries no information about the label beyond what X
   already carries.

This module provides knockoff *generators*: callables

    gen(x: Tensor[B, C, H, W], generator: torch.Generator) -> Tensor (same shape, dtype, device)

Property 2 holds **by construction** for every generator here: the signature has no label argument,
so X~ is a function of X, of the generator's random stream and (for the fitted generators) of
statistics fitted once on unlabelled images. Nothing in the computation can depend on Y. Property 1
is what distinguishes the generators; each docstring says how much of it it delivers.

All randomness comes from the `generator` passed in (same generator state -> same knockoffs).
Random numbers are drawn on the generator's own device and moved to `x`'s, so a CPU generator works
for CUDA inputs (and a CUDA generator for CUDA inputs draws on the GPU).

Generators, strongest claim first (ALGORITHMS.md 2.5):

============  ==============================================  =====================================
name          what X~ is                                      used by
============  ==============================================  =====================================
"shuffle"     X[randperm(B)]: other real images of the batch  MindSpore port (`KfCallback`); default
"generator"   G(z), z ~ N(0, I): a user-supplied generator    official PyTorch code (DCGAN / SNGAN,
                                                              weights not distributed)
"gaussian"    second-order model-X knockoff of block means    fxprune option [I] (Candes et al. 2018)
"noise"       per-channel Gaussian noise                      fxprune option [I]; weakest
============  ==============================================  =====================================

Only "gaussian" is a *pairwise* knockoff of X (X~ built from X, with swap-exchangeability at second
order on its block representation); "shuffle" and "generator" give samples from (an approximation
of) the data distribution that are independent of the sample and its label, which is what both
official implementations actually feed SCOP.

Use `make_knockoff(spec)` to turn a name or callable into a generator object.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxprune.errors import ConfigError, FxPruneError

__all__ = [
    "KnockoffGenerator",
    "ShuffleKnockoff",
    "GaussianKnockoff",
    "NoiseKnockoff",
    "GeneratorKnockoff",
    "CallableKnockoff",
    "KnockoffNotFittedError",
    "KNOCKOFF_NAMES",
    "make_knockoff",
    "tanh_to_normalized",
]


class KnockoffNotFittedError(FxPruneError, RuntimeError):
    """A generator that needs statistics of the data (e.g. "gaussian") was used before `fit()`."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _check_images(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{who}: expected an image batch of shape [B, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise ConfigError(f"{who}: expected a floating-point image batch, got dtype {x.dtype}")


def _gen_device(generator: torch.Generator) -> torch.device:
    return torch.device(generator.device) if generator is not None else torch.device("cpu")


def _randn(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    """Standard normal numbers from `generator`, drawn on the generator's device, returned on `device`."""
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=_gen_device(generator))
    return z.to(device)


def _randperm(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randperm(n, generator=generator, device=_gen_device(generator)).to(device)


def _iter_image_batches(data: Any, max_batches: Optional[int]) -> Iterable[Tensor]:
    """Images from a tensor [N, C, H, W], or an iterable of tensors / (x, y, ...) tuples / lists.

    Labels, when present, are dropped here and never reach the statistics."""
    if isinstance(data, Tensor):
        yield data
        return
    for i, item in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor):
            raise ConfigError(f"fit: expected batches of image tensors or (x, y) pairs, got {type(item).__name__}")
        yield item


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float32, half, bfloat16) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------

class KnockoffGenerator:
    """Base class. Subclasses implement `__call__(x, generator)`; fitted ones also `fit(data)`.

    Contract: the output has x's shape, dtype and device; it never depends on labels (there is no
    label argument); all randomness comes from `generator`."""

    name: str = "knockoff"
    #: True when `fit(data)` must be called before the generator can be used.
    needs_fit: bool = False

    def fit(self, data: Any, max_batches: Optional[int] = None) -> "KnockoffGenerator":
        """Fit statistics on unlabelled images (no-op for generators that need none). Returns self."""
        return self

    @property
    def fitted(self) -> bool:
        return not self.needs_fit

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------
# shuffle
# ----------------------------------------------------------------------------------------------

class ShuffleKnockoff(KnockoffGenerator):
    """"shuffle" (default): X~ = X[randperm(B)], the knockoff of each image is another image of the batch.

    Used by the Huawei MindSpore port of SCOP (`mindspore_gs/pruner/scop`, `KfCallback`), which uses
    no generator at all. Cost: one random permutation and one gather (a copy of the batch); no fitting.

    What it guarantees:
      * each X~_i is a real image, so X~ follows the data distribution exactly (no generator bias);
      * X~ is independent of Y given X: X~ is the batch permuted by a label-blind random permutation.
        Where pi(i) != i, X~_i is a different, independent draw whose own label is unrelated to Y_i.

    What it does not guarantee:
      * it is *not* a pairwise knockoff of X_i: (X_i, X~_i) are independent images, so swapping a
        *subset* of features (pixels, blocks) between them produces a chimera of two images that is
        not distributed like (X, X~). Swap-exchangeability holds only for swapping whole images.
        SCOP then measures reliance on a filter for "this image" versus "some other image".
      * fixed points: with plain randperm (as in the port) some images are their own knockoff
        (on average one per batch; always for B = 1). `derangement=True` draws a random cyclic
        permutation instead, so no image is its own knockoff when B > 1 (a deviation from the port).
    """

    name = "shuffle"

    def __init__(self, derangement: bool = False):
        self.derangement = bool(derangement)

    def permutation(self, batch_size: int, generator: torch.Generator, device=None) -> Tensor:
        """The index tensor used for a batch of `batch_size` (drawn from `generator`)."""
        device = torch.device("cpu") if device is None else device
        perm = _randperm(batch_size, generator, device)
        if self.derangement and batch_size > 1:
            # A random single cycle: image perm[k] takes its knockoff from image perm[k+1].
            idx = torch.empty_like(perm)
            idx[perm] = torch.roll(perm, -1)
            perm = idx
        return perm

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(x, "ShuffleKnockoff")
        return x[self.permutation(x.shape[0], generator, x.device)]

    def __repr__(self) -> str:
        return f"ShuffleKnockoff(derangement={self.derangement})"


# ----------------------------------------------------------------------------------------------
# gaussian (second-order model-X knockoffs on block means)
# ----------------------------------------------------------------------------------------------

def _bins(n: int, g: int, device) -> Tensor:
    """Partition of n pixels into g contiguous bins (bin of pixel i = floor(i * g / n))."""
    return (torch.arange(n, device=device) * g) // n


def _pool_matrix(n: int, g: int, dtype, device) -> Tensor:
    """[g, n] averaging matrix over the bins of `_bins(n, g)` (rows sum to 1)."""
    b = _bins(n, g, device)
    m = torch.zeros(g, n, dtype=dtype, device=device)
    m[b, torch.arange(n, device=device)] = 1.0
    return m / m.sum(dim=1, keepdim=True)


class GaussianKnockoff(KnockoffGenerator):
    """"gaussian": second-order model-X knockoffs (Candes, Fan, Janson & Lv 2018) on block means.

    Not in the paper or either official code; an fxprune option [I] that implements the paper's
    Definition 1 (at second order) instead of approximating it with a GAN, with swaps over blocks of
    pixels as the paper's supplement describes.

    Representation. Each image is average-pooled into a `grid` = (gh, gw) grid of pixel blocks per
    channel: X_low in R^p, p = C * gh * gw (CIFAR, grid 4: 8x8-pixel blocks, p = 3*4*4 = 48; grid 8:
    4x4-pixel blocks, p = 192). `block=b` instead fixes the block size; it is turned into a grid at
    fit time (grid = H // b) and the grid stays fixed afterwards. H and W need not be multiples of
    the grid: pixel i belongs to block floor(i * g / H).

    Fit (`fit(data)`): mu and Sigma of X_low on unlabelled images, with shrinkage of the
    correlations towards the identity, Sigma = (1 - lam) * S + lam * diag(S) where S is the sample
    covariance. `shrinkage="auto"` picks lam by the Schafer & Strimmer (2005) closed form
    ("target D"): lam = sum_{i!=j} Var(r_ij) / sum_{i!=j} r_ij^2, clipped to [0, 1]; a float fixes it.
    At most `max_fit_samples` images are used.

    Construction (equicorrelated, on the correlation scale): with R = corr(Sigma) and
    sigma_j^2 = Sigma_jj,
        s_j = safety * min(1, 2 * lambda_min(R))      (the same s for every j; safety = 0.999 keeps
                                                       the conditional covariance positive definite)
        D   = diag(s_j * sigma_j^2)
        X~_low | X_low ~ N(X_low - D Sigma^-1 (X_low - mu),  2D - D Sigma^-1 D)
    sampled through a Cholesky factor of the conditional covariance (with jitter if needed). Then
    (X_low, X~_low) has mean (mu, mu) and covariance [[Sigma, Sigma - D], [Sigma - D, Sigma]], which is
    invariant under swapping any subset of coordinates: second-order swap-exchangeability.

    Back to pixels: X~ = X + upsample_nearest(X~_low - X_low). Within-block detail is the real
    image's; the block means are exactly X~_low.

    Assumptions and limits:
      * exact knockoffs only if X_low is Gaussian; otherwise the first two moments match (and are
        swap-exchangeable) but higher moments and within-block pixels are not knocked off;
      * equicorrelated s is small when blocks are strongly correlated (lambda_min(R) small), and then
        X~ is close to X: a weak control. This is the normal case for natural images. Measured on 5000
        normalised CIFAR-10 test images (shrinkage "auto"), the RGB channels and neighbouring blocks
        being nearly collinear:
            grid 2 (p=12):  lambda_min 0.0056, s 0.011, RMS change of the block means 0.10
            grid 4 (p=48):  lambda_min 0.0032, s 0.0063, RMS change 0.089
            grid 8 (p=192): lambda_min 0.0019, s 0.0038, RMS change 0.075
        (inputs have unit std). A max-entropy s (coordinate ascent) was tried and raised s by only
        ~1.2-1.5x there, so it is not offered: a Gaussian knockoff of a feature can only differ from
        it by that feature's conditional variance given the others, which is small for images.
        `s`, `lambda_min` and `shrinkage_used` are exposed after fit; check them;
      * fitted for one channel count and grid; inputs of another size are pooled onto the same grid.

    Cost: fit O(N p^2 + p^3) once; per batch O(B C H W) for pooling/upsampling plus O(B p^2).
    """

    name = "gaussian"
    needs_fit = True

    def __init__(self, grid: Union[int, Tuple[int, int]] = 4, block: Optional[int] = None,
                 shrinkage: Union[str, float] = "auto", safety: float = 0.999,
                 fit_data: Any = None, max_fit_batches: Optional[int] = None,
                 max_fit_samples: int = 50_000):
        if block is not None:
            if int(block) < 1:
                raise ConfigError(f"GaussianKnockoff: block must be >= 1, got {block}")
            self.block: Optional[int] = int(block)
            self.grid: Optional[Tuple[int, int]] = None
        else:
            gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
            if gh < 1 or gw < 1:
                raise ConfigError(f"GaussianKnockoff: grid must be >= 1, got {grid}")
            self.block = None
            self.grid = (int(gh), int(gw))
        if isinstance(shrinkage, str):
            if shrinkage != "auto":
                raise ConfigError(f"GaussianKnockoff: shrinkage must be 'auto' or a float in [0, 1], got {shrinkage!r}")
        elif not 0.0 <= float(shrinkage) <= 1.0:
            raise ConfigError(f"GaussianKnockoff: shrinkage must be in [0, 1], got {shrinkage}")
        if not 0.0 < safety <= 1.0:
            raise ConfigError(f"GaussianKnockoff: safety must be in (0, 1], got {safety}")
        self.shrinkage = shrinkage
        self.safety = float(safety)
        self.max_fit_samples = int(max_fit_samples)
        # fitted state (float64, CPU)
        self.channels: Optional[int] = None
        self.mu: Optional[Tensor] = None
        self.sigma: Optional[Tensor] = None
        self.shrinkage_used: Optional[float] = None
        self.lambda_min: Optional[float] = None
        self.s: Optional[Tensor] = None          # s_j on the correlation scale
        self.D: Optional[Tensor] = None          # diag(s_j sigma_j^2), as a vector
        self._A: Optional[Tensor] = None         # I - Sigma^-1 D  (row-vector form: mean = mu + (x-mu) @ A)
        self._L: Optional[Tensor] = None         # Cholesky factor of 2D - D Sigma^-1 D
        self.n_fit: int = 0
        if fit_data is not None:
            self.fit(fit_data, max_batches=max_fit_batches)

    # -- representation ------------------------------------------------------------------------
    @property
    def p(self) -> Optional[int]:
        """Dimension of the block representation (C * gh * gw), known after fit."""
        if self.channels is None or self.grid is None:
            return None
        return self.channels * self.grid[0] * self.grid[1]

    def _resolve_grid(self, h: int, w: int) -> Tuple[int, int]:
        if self.grid is not None:
            return self.grid
        b = self.block
        if h < b or w < b:
            raise ConfigError(f"GaussianKnockoff: block {b} is larger than the image ({h}x{w})")
        return (h // b, w // b)

    def pool(self, x: Tensor) -> Tensor:
        """Block means: [B, C, H, W] -> [B, C * gh * gw] (in x's compute dtype)."""
        gh, gw = self._resolve_grid(x.shape[2], x.shape[3])
        h, w = x.shape[2], x.shape[3]
        if h < gh or w < gw:
            raise ConfigError(f"GaussianKnockoff: image {h}x{w} is smaller than the grid {gh}x{gw}")
        dt = _compute_dtype(x)
        ph = _pool_matrix(h, gh, dt, x.device)
        pw = _pool_matrix(w, gw, dt, x.device)
        low = torch.einsum("ih,bchw,jw->bcij", ph, x.to(dt), pw)
        return low.reshape(x.shape[0], -1)

    def _upsample(self, low: Tensor, h: int, w: int) -> Tensor:
        """[B, C*gh*gw] -> [B, C, H, W], each pixel taking its block's value (nearest)."""
        gh, gw = self.grid
        low = low.reshape(low.shape[0], -1, gh, gw)
        rb, cb = _bins(h, gh, low.device), _bins(w, gw, low.device)
        return low[:, :, rb][:, :, :, cb]

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, data: Any, max_batches: Optional[int] = None) -> "GaussianKnockoff":
        """Fit mu, Sigma and the knockoff construction on unlabelled images.

        `data`: a tensor [N, C, H, W], or an iterable of image tensors or (x, y, ...) batches (labels
        are dropped unread). Uses at most `max_batches` batches and `max_fit_samples` images."""
        chunks: List[Tensor] = []
        n = 0
        channels = None
        for xb in _iter_image_batches(data, max_batches):
            _check_images(xb, "GaussianKnockoff.fit")
            if channels is None:
                channels = xb.shape[1]
                if self.grid is None:
                    self.grid = self._resolve_grid(xb.shape[2], xb.shape[3])
            elif xb.shape[1] != channels:
                raise ConfigError(f"GaussianKnockoff.fit: batches have {channels} and {xb.shape[1]} channels")
            take = min(xb.shape[0], self.max_fit_samples - n)
            with torch.no_grad():
                chunks.append(self.pool(xb[:take].detach()).to("cpu", torch.float64))
            n += take
            if n >= self.max_fit_samples:
                break
        if n < 2:
            raise ConfigError(f"GaussianKnockoff.fit: need at least 2 images, got {n}")
        X = torch.cat(chunks)
        self.channels = channels
        self.n_fit = n
        self._fit_moments(X)
        return self

    def _fit_moments(self, X: Tensor) -> None:
        n, p = X.shape
        mu = X.mean(0)
        Xc = X - mu
        S = Xc.T @ Xc / (n - 1)
        var = S.diagonal().clone()
        floor = 1e-12 * max(float(var.mean()), 1e-30)
        var = var.clamp_min(floor)
        sd = var.sqrt()
        R_emp = S / sd[:, None] / sd[None, :]
        R_emp.fill_diagonal_(1.0)
        if self.shrinkage == "auto":
            lam = self._auto_shrinkage(Xc / sd, n)
        else:
            lam = float(self.shrinkage)
        R = (1.0 - lam) * R_emp
        R.fill_diagonal_(1.0)
        R = 0.5 * (R + R.T)
        lam_min = float(torch.linalg.eigvalsh(R)[0])
        if lam_min <= 1e-10:
            raise ConfigError(
                f"GaussianKnockoff.fit: the block covariance is singular (lambda_min of the correlation "
                f"matrix = {lam_min:.3g}, n = {n} images, p = {p}); use shrinkage > 0 ('auto'), more fit "
                f"data or a coarser grid")
        s_corr = self.safety * min(1.0, 2.0 * lam_min)
        # Work on the correlation scale (well conditioned), then scale back by the std.
        R_inv = torch.cholesky_inverse(torch.linalg.cholesky(R))
        s_vec = torch.full((p,), s_corr, dtype=torch.float64)
        # Correlation scale: A_R = I - R^-1 diag(s); V_R = 2 diag(s) - diag(s) R^-1 diag(s).
        V_R = 2.0 * torch.diag(s_vec) - s_vec[:, None] * R_inv * s_vec[None, :]
        V_R = 0.5 * (V_R + V_R.T)
        L_R = self._cholesky_jitter(V_R)
        # Pixel scale: Sigma = S_d R S_d, D = S_d diag(s) S_d, S_d = diag(sd).
        #   Sigma^-1 D = S_d^-1 R^-1 diag(s) S_d ;  V = S_d V_R S_d  ->  L = S_d L_R.
        SinvD = (1.0 / sd)[:, None] * (R_inv * s_vec[None, :]) * sd[None, :]
        self.mu = mu
        self.sigma = sd[:, None] * R * sd[None, :]
        self.shrinkage_used = lam
        self.lambda_min = lam_min
        self.s = s_vec
        self.D = s_vec * var
        # Column form: E[x~ | x] = mu + (I - D Sigma^-1)(x - mu). Row-vector form (x a row):
        # mu + (x - mu) (I - D Sigma^-1)^T = mu + (x - mu) (I - Sigma^-1 D), Sigma and D symmetric.
        self._A = (torch.eye(p, dtype=torch.float64) - SinvD).contiguous()
        self._L = (sd[:, None] * L_R).contiguous()

    @staticmethod
    def _auto_shrinkage(Z: Tensor, n: int) -> float:
        """Schafer & Strimmer (2005) shrinkage intensity of the correlations towards 0 (target D).

        Z: centred data divided by the std, [n, p]."""
        p = Z.shape[1]
        if p < 2:
            return 0.0
        W_mean = Z.T @ Z / n                             # mean_k z_ki z_kj
        W_sq = (Z * Z).T @ (Z * Z)                       # sum_k (z_ki z_kj)^2
        var_r = n / (n - 1) ** 3 * (W_sq - n * W_mean ** 2)
        r = n / (n - 1) * W_mean
        off = ~torch.eye(p, dtype=torch.bool)
        denom = float((r[off] ** 2).sum())
        if denom <= 0.0:
            return 1.0
        return float(min(1.0, max(0.0, float(var_r[off].sum()) / denom)))

    @staticmethod
    def _cholesky_jitter(V: Tensor) -> Tensor:
        scale = max(float(V.diagonal().mean()), 1e-30)
        jitter = 0.0
        eye = torch.eye(V.shape[0], dtype=V.dtype)
        for _ in range(12):
            L, info = torch.linalg.cholesky_ex(V + jitter * eye)
            if int(info) == 0:
                return L
            jitter = 1e-12 * scale if jitter == 0.0 else jitter * 10.0
        # Last resort: symmetric square root with negative eigenvalues clipped.
        evals, evecs = torch.linalg.eigh(V)
        return evecs * evals.clamp_min(0.0).sqrt()[None, :]

    @property
    def fitted(self) -> bool:
        return self._A is not None

    # -- sample ----------------------------------------------------------------------------------
    def sample_low(self, x_low: Tensor, generator: torch.Generator) -> Tensor:
        """X~_low given X_low ([B, p], any float dtype/device); returns float64 on x_low's device."""
        if not self.fitted:
            raise KnockoffNotFittedError(
                "GaussianKnockoff was used before fit(): call .fit(images or batches) on (unlabelled) "
                "training images first, or pass fit_data= to the constructor")
        dev = x_low.device
        A, L, mu = self._A.to(dev), self._L.to(dev), self.mu.to(dev)
        xl = x_low.to(torch.float64)
        z = _randn((xl.shape[0], xl.shape[1]), generator, torch.float64, dev)
        return mu + (xl - mu) @ A + z @ L.T

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(x, "GaussianKnockoff")
        if not self.fitted:
            self.sample_low(x.new_zeros(0, 0), generator)  # raises KnockoffNotFittedError
        if x.shape[1] != self.channels:
            raise ConfigError(f"GaussianKnockoff: fitted on {self.channels}-channel images, got {x.shape[1]} channels")
        with torch.no_grad():
            x_low = self.pool(x)
            diff = self.sample_low(x_low, generator) - x_low.to(torch.float64)
            up = self._upsample(diff.to(x_low.dtype), x.shape[2], x.shape[3])
            return (x.to(up.dtype) + up).to(x.dtype)

    def __repr__(self) -> str:
        rep = f"block={self.block}" if self.block is not None and self.grid is None else f"grid={self.grid}"
        state = (f", p={self.p}, shrinkage={self.shrinkage_used:.3g}, s={float(self.s[0]):.3g}"
                 if self.fitted else ", unfitted")
        return f"GaussianKnockoff({rep}{state})"


# ----------------------------------------------------------------------------------------------
# noise
# ----------------------------------------------------------------------------------------------

class NoiseKnockoff(KnockoffGenerator):
    """"noise": X~ = mean_c + std_c * N(0, 1), i.i.d. per pixel, per channel c. The weakest option [I].

    The mean and std are the current batch's (over B, H, W) unless `fit(data)` was called or `mean`
    and `std` were given (per-channel sequences), in which case those are used. X~ ignores X except
    for these two numbers per channel: it matches the data's first two per-channel moments only (no
    spatial structure, no cross-channel correlation), so it is neither a pairwise knockoff nor a
    realistic sample; it only supplies "label-free input with the right scale".
    Cost: one Gaussian draw of the batch's size.
    """

    name = "noise"

    def __init__(self, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        if (mean is None) != (std is None):
            raise ConfigError("NoiseKnockoff: give both mean and std, or neither")
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float64).flatten()

    def fit(self, data: Any, max_batches: Optional[int] = None) -> "NoiseKnockoff":
        """Per-channel mean and std over all pixels of the given (unlabelled) images."""
        total = sq = None
        count = 0
        for xb in _iter_image_batches(data, max_batches):
            _check_images(xb, "NoiseKnockoff.fit")
            xb = xb.detach().to("cpu", torch.float64)
            s, q = xb.sum(dim=(0, 2, 3)), (xb * xb).sum(dim=(0, 2, 3))
            total, sq = (s, q) if total is None else (total + s, sq + q)
            count += xb.shape[0] * xb.shape[2] * xb.shape[3]
        if count < 2:
            raise ConfigError("NoiseKnockoff.fit: no images")
        self.mean = total / count
        self.std = ((sq - count * self.mean ** 2) / (count - 1)).clamp_min(0.0).sqrt()
        return self

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(x, "NoiseKnockoff")
        dt = _compute_dtype(x)
        if self.mean is not None:
            if self.mean.numel() != x.shape[1]:
                raise ConfigError(f"NoiseKnockoff: has statistics for {self.mean.numel()} channels, got {x.shape[1]}")
            mean, std = self.mean.to(x.device, dt), self.std.to(x.device, dt)
        else:
            xf = x.detach().to(dt)
            mean = xf.mean(dim=(0, 2, 3))
            std = xf.std(dim=(0, 2, 3)) if xf[:, 0].numel() > 1 else torch.zeros_like(mean)
        z = _randn(x.shape, generator, dt, x.device)
        return (mean[None, :, None, None] + std[None, :, None, None] * z).to(x.dtype)

    def __repr__(self) -> str:
        return f"NoiseKnockoff({'fitted' if self.mean is not None else 'batch statistics'})"


# ----------------------------------------------------------------------------------------------
# user-supplied generator network
# ----------------------------------------------------------------------------------------------

def tanh_to_normalized(mean: Sequence[float], std: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """Normaliser for a generator whose output lies in [-1, 1] (tanh, as the official SCOP generators):
    maps to [0, 1] and then to (x - mean) / std per channel, the usual input normalisation."""
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def normalize(y: Tensor) -> Tensor:
        return ((y + 1.0) * 0.5 - m.to(y.device, y.dtype)) / s.to(y.device, y.dtype)

    return normalize


class GeneratorKnockoff(KnockoffGenerator):
    """"generator": X~ = normalize(G(z)), z ~ N(0, I), one fresh z per image and batch.

    This is what the official PyTorch code does (huawei-noah/Efficient-Computing,
    Pruning/SCOP_NeurIPS2020): an *unconditional* generator, z_dim = 128 — a DCGAN for CIFAR
    (32x32 output) and an SNGAN `ResNetGenerator` for ImageNet (64x64, nearest-upsampled to 224).
    Its trained weights are not distributed, so the user supplies G (any nn.Module or callable
    mapping [B, *z_shape] -> [B, C, h, w]).

    * `z_dim`: an int (z has shape [B, z_dim]) or a tuple (z has shape [B, *z_dim], e.g. (128, 1, 1)
      for generators that start with a transposed conv).
    * The output is resized to x's H x W with nearest-neighbour interpolation when it differs (as
      the official ImageNet code does).
    * `normalize`: a callable applied to G's (resized) output. The official generators end in tanh
      and output [-1, 1], *not* mean/std-normalised like the real inputs, and the official code
      feeds that to the network as is; pass `tanh_to_normalized(mean, std)` to match the real data's
      normalisation instead (a deviation from the official code).

    Like "shuffle", X~ is independent of X altogether (only the batch size and image size are
    read), so it is a sample from the generator's distribution, not a pairwise knockoff; X~ is
    independent of Y given X by construction. G runs under `torch.no_grad()` in whatever
    train/eval mode the caller left it (put it in eval mode if it has BatchNorm).
    Cost: one forward pass of G per batch.
    """

    name = "generator"

    def __init__(self, g: Union[nn.Module, Callable[[Tensor], Tensor]], z_dim: Union[int, Sequence[int]],
                 normalize: Optional[Callable[[Tensor], Tensor]] = None):
        if not callable(g):
            raise ConfigError(f"GeneratorKnockoff: g must be an nn.Module or callable, got {type(g).__name__}")
        self.g = g
        self.z_shape: Tuple[int, ...] = (int(z_dim),) if isinstance(z_dim, int) else tuple(int(d) for d in z_dim)
        if not self.z_shape or any(d < 1 for d in self.z_shape):
            raise ConfigError(f"GeneratorKnockoff: z_dim must be positive, got {z_dim}")
        if normalize is not None and not callable(normalize):
            raise ConfigError("GeneratorKnockoff: normalize must be a callable or None")
        self.normalize = normalize

    def _g_device_dtype(self, x: Tensor) -> Tuple[torch.device, torch.dtype]:
        if isinstance(self.g, nn.Module):
            for t in self.g.parameters():
                return t.device, t.dtype
        return x.device, _compute_dtype(x)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        _check_images(x, "GeneratorKnockoff")
        dev, dt = self._g_device_dtype(x)
        z = _randn((x.shape[0],) + self.z_shape, generator, dt, dev)
        with torch.no_grad():
            y = self.g(z)
        if not isinstance(y, Tensor) or y.dim() != 4 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ConfigError(f"GeneratorKnockoff: G(z) must return [B, C, h, w] with B = {x.shape[0]}, got {shape}")
        if y.shape[1] != x.shape[1]:
            raise ConfigError(f"GeneratorKnockoff: G outputs {y.shape[1]} channels, the data has {x.shape[1]}")
        y = y.to(x.device)
        if tuple(y.shape[2:]) != tuple(x.shape[2:]):
            y = F.interpolate(y, size=tuple(x.shape[2:]), mode="nearest")
        if self.normalize is not None:
            y = self.normalize(y)
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return f"GeneratorKnockoff(g={type(self.g).__name__}, z_shape={self.z_shape}, normalize={self.normalize is not None})"


# ----------------------------------------------------------------------------------------------
# arbitrary callables and the factory
# ----------------------------------------------------------------------------------------------

class CallableKnockoff(KnockoffGenerator):
    """Wraps a user function `fn(x, generator) -> x~` and checks its output's shape, dtype and device.

    The function is the user's responsibility: it must not read labels (it is not given any)."""

    name = "callable"

    def __init__(self, fn: Callable[[Tensor, torch.Generator], Tensor]):
        self.fn = fn

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        y = self.fn(x, generator)
        if not isinstance(y, Tensor) or y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
            got = (tuple(y.shape), y.dtype, str(y.device)) if isinstance(y, Tensor) else type(y).__name__
            raise ConfigError(
                f"knockoff callable {getattr(self.fn, '__name__', self.fn)!r} must return a tensor of the "
                f"input's shape/dtype/device {(tuple(x.shape), x.dtype, str(x.device))}, got {got}")
        return y

    def __repr__(self) -> str:
        return f"CallableKnockoff({getattr(self.fn, '__name__', repr(self.fn))})"


KNOCKOFF_NAMES = {
    "shuffle": ShuffleKnockoff,
    "gaussian": GaussianKnockoff,
    "noise": NoiseKnockoff,
}


def make_knockoff(spec: Union[None, str, KnockoffGenerator, Callable] = "shuffle") -> KnockoffGenerator:
    """A knockoff generator from a name, a generator object or a callable.

    * None or "shuffle" -> ShuffleKnockoff(); "gaussian" -> GaussianKnockoff() (call `.fit()` on
      images before use); "noise" -> NoiseKnockoff(); names are case-insensitive.
    * "generator" needs a network: pass `GeneratorKnockoff(G, z_dim)` instead.
    * a KnockoffGenerator (including GeneratorKnockoff) is returned as is;
    * any other callable `fn(x, generator) -> x~` is wrapped in CallableKnockoff (output checked).
    """
    if spec is None:
        return ShuffleKnockoff()
    if isinstance(spec, KnockoffGenerator):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in KNOCKOFF_NAMES:
            return KNOCKOFF_NAMES[key]()
        choices = ", ".join(repr(k) for k in KNOCKOFF_NAMES)
        if key == "generator":
            raise ConfigError(
                "knockoff='generator' needs a generator network: pass GeneratorKnockoff(G, z_dim, "
                f"normalize=...) instead of the name (names: {choices})")
        raise ConfigError(
            f"unknown knockoff {spec!r}; choose one of {choices}, a GeneratorKnockoff(G, z_dim) or a "
            f"callable fn(x, generator) -> x~")
    if isinstance(spec, nn.Module):
        raise ConfigError(
            f"knockoff: got the network {type(spec).__name__} itself; wrap a generator network as "
            f"GeneratorKnockoff(G, z_dim), or pass a KnockoffGenerator / callable fn(x, generator)")
    if callable(spec):
        _check_signature(spec)
        return CallableKnockoff(spec)
    raise ConfigError(f"knockoff: expected a name, a KnockoffGenerator or a callable, got {type(spec).__name__}")


def _check_signature(fn: Callable) -> None:
    """Reject callables that cannot be called as fn(x, generator) (when the signature is inspectable)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None)
    except TypeError:
        raise ConfigError(
            f"knockoff callable {getattr(fn, '__name__', fn)!r} must accept (x, generator); its signature "
            f"is {sig}") from None
