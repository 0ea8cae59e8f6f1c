"""Metrics: sample distances, likelihood under the exact data density, distance to the teacher, straightness, FID.

    sliced_wasserstein(x, y)       SW_2 between two equal-size sample sets (N, ...)        2D and images
    mmd(x, y)                      unbiased squared MMD, sum of RBF kernels                 2D and images
    gmm_nll(x, gmm)                mean -log p_0(x) under a GaussianMixture (nats)          2D
    gmm_class_accuracy(x, y, gmm)  fraction of points whose Bayes-optimal class is y        2D
    precision_recall(x, ref)       k-NN precision (sharpness) and recall (coverage), Kynkaenniemi et al. 2019
    mode_coverage(x, gmm)          modes of a Gaussian mixture that samples reach, and how mass spreads over them
    in_squares(x)                  fraction of 2D points on the checkerboard's filled squares
    flow_map_error(x, x_ref)       RMS distance to the teacher's ODE solution from the same noise
    straightness(path, ts)         Liu et al. 2022's S(Z) of a sampled trajectory
    frechet_distance(fa, fb)       Frechet distance between Gaussians fitted to two feature sets
    kid(fa, fb)                    unbiased kernel distance (KID) and its standard error
    spread(values)                 mean and standard deviation over evaluation seeds
    cifar10_fid(samples)           clean-fid's FID against CIFAR-10 train statistics (needs a download once)

Every function returns a Python float. Sample-based distances are biased by the sample count: two samples of the
*same* distribution give SW > 0 and Frechet distance > 0, both shrinking as N grows, so the course always
compares methods at one stated N (and one seed for the projections).
"""
from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # imported lazily at run time: metrics sits below data2d in the layering
    from .data2d import GaussianMixture

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # RBF widths in data units (2D toy data has std ~1)


class MetricUnavailable(RuntimeError):
    """A metric needs something that cannot be had here (e.g. Inception weights offline); the message says what
    to use instead."""


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for accumulations, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _as_rows(x: Tensor, name: str) -> Tensor:
    """(N, ...) -> (N, D) in the working dtype; images are flattened."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"{name} must be a tensor of shape (N, D) or (N, C, H, W); got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x.detach().flatten(1).to(_work_dtype(x.device))


# ----------------------------------------------------------------------------------------------------------------
# Sample distances
# ----------------------------------------------------------------------------------------------------------------

def projections(dim: int, n_proj: int = 256, seed: int = 0) -> Tensor:
    """Fixed random unit directions theta_p, uniform on the sphere S^{dim-1}: (n_proj, dim) float32 on the CPU.

    Drawn from a generator seeded with `seed` (normalised standard Gaussians), so every call with the same
    arguments returns the same directions and SW values are comparable across runs.
    """
    if dim < 1 or n_proj < 1:
        raise ValueError(f"dim and n_proj must be >= 1; got dim={dim}, n_proj={n_proj}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_proj, dim, generator=g, dtype=torch.float64)
    return (theta / theta.norm(dim=1, keepdim=True)).float()


def sliced_wasserstein(x: Tensor, y: Tensor, n_proj: int = 256, seed: int = 0,
                       directions: Tensor | None = None) -> float:
    """Sliced 2-Wasserstein distance (Bonneel et al. 2015) between the empirical measures of x and y.

        SW_2(x, y) = sqrt( mean_p  mean_i ( sort(x . theta_p)_i - sort(y . theta_p)_i )^2 )

    In 1D the optimal transport between two N-point empirical measures matches sorted values, so each slice is
    exact; the only approximation is the Monte-Carlo average over the n_proj directions theta_p
    (`projections(D, n_proj, seed)`, or `directions` (P, D) to pass your own).

    x, y: (N, D) or (N, C, H, W) (flattened), with the *same* N. The value depends on N: two independent samples
    of the same distribution give SW ~ N^{-1/2} > 0, so the course compares methods at a stated N.
    """
    a, b = _as_rows(x, "x"), _as_rows(y, "y").to(x.device)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs x and y of the same shape (N, D); got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}. Draw the same number of samples from both (e.g. y[:len(x)]).")
    theta = projections(a.shape[1], n_proj, seed) if directions is None else directions
    if theta.dim() != 2 or theta.shape[1] != a.shape[1]:
        raise ValueError(f"directions must have shape (P, {a.shape[1]}); got {tuple(theta.shape)}")
    theta = theta.to(a)
    pa = torch.sort(theta @ a.T, dim=1).values                                     # (P, N), sorted per direction
    pb = torch.sort(theta @ b.T, dim=1).values                                     # (P, N) (rows contiguous: fast)
    return float((pa - pb).pow(2).mean().sqrt())


def _rbf_sum(a: Tensor, b: Tensor, bandwidths: Sequence[float], exclude_diagonal: bool,
             block: int = 1024) -> Tensor:
    """sum_{i,j} sum_h exp(-|a_i - b_j|^2 / (2 h^2)), rows of a taken `block` at a time (memory O(block * M))."""
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    inv = [1.0 / (2.0 * h * h) for h in bandwidths]
    for start in range(0, len(a), block):
        d2 = torch.cdist(a[start:start + block], b).pow(2)                         # (block, M)
        k = sum(torch.exp(-c * d2) for c in inv)
        if exclude_diagonal:  # a is b: drop the i == j terms
            idx = torch.arange(start, start + len(d2), device=a.device)
            k[idx - start, idx] = 0.0
        total = total + k.sum()
    return total


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> float:
    """Unbiased squared maximum mean discrepancy MMD_u^2 (Gretton et al. 2012, JMLR, Eq. 3 / Lemma 6):

        MMD_u^2 = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)

    with the characteristic kernel k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over `bandwidths` h (data units;
    the default suits the 2D toys, whose std is ~1). x (m, ...), y (n, ...), m, n >= 2, flattened to rows.
    Unbiased means E[MMD_u^2] = 0 for equal distributions, so a single value can be slightly negative.
    Cost O((m + n)^2); the course uses a few thousand samples.
    """
    a, b = _as_rows(x, "x"), _as_rows(y, "y").to(x.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples in each set; got {m} and {n}")
    kxx = _rbf_sum(a, a, bandwidths, exclude_diagonal=True) / (m * (m - 1))
    kyy = _rbf_sum(b, b, bandwidths, exclude_diagonal=True) / (n * (n - 1))
    kxy = _rbf_sum(a, b, bandwidths, exclude_diagonal=False) / (m * n)
    return float(kxx + kyy - 2.0 * kxy)


def gmm_nll(x: Tensor, gmm: "GaussianMixture") -> float:
    """Mean negative log-likelihood -1/N sum_i log p_0(x_i) of samples x (N, D) under the data density (nats).

    Samples drawn from p_0 itself score the entropy H(p_0) = -E_p0[log p_0] on average. Lower is not always
    better: samples collapsed onto the modes score *below* the entropy, so read it beside SW or MMD.
    """
    if x.dim() != 2:
        raise ValueError(f"gmm_nll needs points of shape (N, D); got {tuple(x.shape)}")
    return float(-gmm.log_prob(x.detach().to(_work_dtype(x.device))).mean())


def gmm_class_accuracy(x: Tensor, labels: Tensor, gmm: "GaussianMixture") -> float:
    """Fraction of points x (N, D) whose Bayes-optimal class argmax_c p(c | x) under the mixture equals labels
    (N,): how often a class-conditional sampler lands in the right class."""
    if x.dim() != 2 or labels.shape != (len(x),):
        raise ValueError(f"need x (N, D) and labels (N,); got {tuple(x.shape)} and {tuple(labels.shape)}")
    pred = gmm.posterior_class_probs(x.detach().to(_work_dtype(x.device))).argmax(dim=1)
    return float((pred.cpu() == labels.cpu()).double().mean())


def mode_coverage(x: Tensor, gmm: "GaussianMixture", radius: float = 3.0, min_share: float = 0.25) -> dict:
    """Which modes of a Gaussian mixture samples x (N, D) reach, and how their mass spreads (the mode-collapse metric
    of GAN papers on the ring of Gaussians: Metz et al. 2017; Srivastava et al. 2017, VEEGAN).

    Each sample goes to its nearest component k by Mahalanobis distance d_k(x) = sqrt((x - mu_k)^T S_k^-1 (x - mu_k));
    it is ON that mode when d_k(x) <= radius. mass_k = share of all samples on mode k. Returns a dict:
        "modes_covered"  number of components with mass_k >= min_share w_k (a quarter of their share, by default)
        "num_modes"      K
        "on_modes"       share of samples on some mode (exact samples in D = 2: 1 - exp(-radius^2 / 2), 0.989)
        "mass_tv"        total variation 1/2 sum_k |mass_k / on_modes - w_k| between the on-mode mass and the weights
                         (0: spread as the data; 1 - w_k: everything on mode k)
        "mass"           [mass_k] (K values)
    A collapsed generator keeps high precision and a low SWD on the modes it keeps; this says how many it keeps."""
    if x.dim() != 2 or x.shape[1] != gmm.dim:
        raise ValueError(f"mode_coverage needs points of shape (N, {gmm.dim}); got {tuple(x.shape)}")
    if len(x) == 0 or radius <= 0 or not 0 < min_share <= 1:
        raise ValueError(f"need N >= 1 samples, radius > 0 and 0 < min_share <= 1; got N = {len(x)}, radius = "
                         f"{radius}, min_share = {min_share}")
    xw = x.detach().cpu().to(torch.float64)
    z = torch.einsum("nkd,kde->nke", xw[:, None, :] - gmm.means[None], gmm._U)      # (N, K, D) eigen-coordinates
    d = (z.pow(2) / gmm._lam[None]).sum(-1).sqrt()                                  # (N, K) Mahalanobis distances
    dmin, k = d.min(1)
    on = dmin <= radius
    mass = torch.bincount(k[on], minlength=gmm.num_components).double() / len(xw)   # (K,)
    on_modes = float(on.double().mean())
    tv = 0.5 * float((mass / max(on_modes, 1e-12) - gmm.weights).abs().sum()) if on_modes > 0 else 1.0
    return {"modes_covered": int((mass >= min_share * gmm.weights).sum()), "num_modes": gmm.num_components,
            "on_modes": on_modes, "mass_tv": tv, "mass": [float(m) for m in mass]}


def precision_recall(x: Tensor, ref: Tensor, k: int = 5, block: int = 2048) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3) of samples x (N, ...) against reference
    samples ref (M, ...) of the data:

        manifold(S) = union over s in S of the ball around s of radius |s - NN_k(s, S)|   (k-th nearest neighbour)
        precision   = fraction of x inside manifold(ref)      low: samples off the data (blur, spurious modes)
        recall      = fraction of ref inside manifold(x)      low: parts of the data never generated (dropped modes)

    SWD alone rewards a blurred sampler; precision falls when samples leave the data and recall when modes are
    dropped, so the pair says *which* failure a number hides. Exact samples score about (0.9-1, 0.9-1) with the
    default k; compare at one N and k. Cost O(N M) distances, computed `block` rows at a time."""
    a, b = _as_rows(x, "x"), _as_rows(ref, "ref").to(x.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and ref must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than k samples in each set; got {len(a)}, {len(b)}")

    def radii(s: Tensor) -> Tensor:  # (N,) distance of each point to its k-th nearest other point
        out = []
        for i in range(0, len(s), block):
            d = torch.cdist(s[i:i + block], s)                                       # (block, N)
            out.append(d.kthvalue(k + 1, dim=1).values)                              # +1: the point itself is at 0
        return torch.cat(out)

    def inside(q: Tensor, s: Tensor, r: Tensor) -> Tensor:  # (Q,) is q_i within r_j of some s_j
        hits = []
        for i in range(0, len(q), block):
            hits.append((torch.cdist(q[i:i + block], s) <= r[None]).any(dim=1))
        return torch.cat(hits)

    precision = inside(a, b, radii(b)).double().mean()
    recall = inside(b, a, radii(a)).double().mean()
    return float(precision), float(recall)


def in_squares(x: Tensor) -> float:
    """Fraction of 2D points x (N, 2) that lie on a filled square of the checkerboard (data2d.checkerboard: unit
    cells (i, j) of the 4x4 board on [-2, 2]^2 with i + j even). Exact samples score 1; a sampler that blurs the
    squares' edges or fills the gaps scores less, which SWD alone hardly shows."""
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"in_squares needs points of shape (N, 2); got {tuple(x.shape)}")
    cell = torch.floor(x.detach().double() + 2.0)                                     # (N, 2) column, row
    on_board = ((cell >= 0) & (cell <= 3)).all(dim=1)
    filled = (cell.sum(dim=1) % 2 == 0)
    return float((on_board & filled).double().mean())


def flow_map_error(x: Tensor, x_ref: Tensor) -> float:
    """Root-mean-square distance sqrt( 1/N sum_i |x_i - x_ref_i|^2 ) between a student's outputs x (N, ...) and a
    reference solve x_ref (N, ...) of the teacher's ODE *from the same noise* (|.| is the L2 norm over all
    non-batch dimensions). It measures how well the student learned the teacher's flow map, separately from how
    good the teacher is."""
    if x.shape != x_ref.shape:
        raise ValueError(f"x and x_ref must have the same shape (one reference per sample, from the same noise); "
                         f"got {tuple(x.shape)} and {tuple(x_ref.shape)}")
    d = _as_rows(x, "x") - _as_rows(x_ref, "x_ref").to(x.device)
    return float(d.pow(2).sum(dim=1).mean().sqrt())


def straightness(path: Tensor, ts: Tensor) -> float:
    """Straightness S(Z) of trajectories (Liu et al. 2022, "Flow straight and fast", the measure S(Z) of reflow):

        S(Z) = 1/T int E | (Z_end - Z_start)/T' - dZ_t/dt |^2 dt,    T' = t_end - t_start (signed), T = |T'|

    path: (n+1, B, ...) the states Z_{t_i} of B trajectories at the times ts: (n+1,), monotone (course
    convention: decreasing from 1 (noise) to 0 (data)). dZ/dt on segment i is the finite difference
    v_i = (Z_{i+1} - Z_i) / (t_{i+1} - t_i), constant on the segment, so the integral is the sum over segments
    weighted by |t_{i+1} - t_i|. Normalisation: |.|^2 is summed over the data dimensions (not averaged) and E
    averages over the B trajectories; dividing by the duration T makes S a time average, in squared velocity
    units, equal to Liu et al.'s definition for T = 1. Since sum_i v_i (t_{i+1} - t_i) = Z_end - Z_start,
    S = (time-average of E|v|^2) - E|(Z_end - Z_start)/T'|^2 >= 0, with equality iff every trajectory is a
    straight line traversed at constant speed (then one Euler step is exact).
    """
    if path.dim() < 2 or ts.dim() != 1 or len(ts) != len(path) or len(ts) < 2:
        raise ValueError(f"straightness needs path (n+1, B, ...) and ts (n+1,) with n >= 1; got "
                         f"{tuple(path.shape)} and {tuple(ts.shape)}")
    wd = _work_dtype(path.device)
    z = path.detach().to(wd).flatten(2)                                             # (n+1, B, D)
    t = ts.detach().to(device=path.device, dtype=wd)
    dt = t[1:] - t[:-1]                                                             # (n,)
    if not ((dt > 0).all() or (dt < 0).all()):
        raise ValueError("ts must be strictly monotone (e.g. decreasing from 1 to 0)")
    v = (z[1:] - z[:-1]) / dt[:, None, None]                                        # (n, B, D) segment velocities
    v_bar = (z[-1] - z[0]) / (t[-1] - t[0])                                         # (B, D) straight-line velocity
    dev = (v - v_bar[None]).pow(2).sum(dim=2).mean(dim=1)                           # (n,)  E|v_bar - v_i|^2
    return float((dev * dt.abs()).sum() / (t[-1] - t[0]).abs())


# ----------------------------------------------------------------------------------------------------------------
# Frechet distances
# ----------------------------------------------------------------------------------------------------------------

def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D) (Heusel et al. 2017):

        d^2 = |mu_a - mu_b|^2 + tr( S_a + S_b - 2 (S_a S_b)^{1/2} )

    computed by clean-fid's `fid.frechet_distance` on the sample means and (unbiased) covariances. This is FID
    only when the features are Inception's pool3 features of images processed as clean-fid does (see
    `cifar10_fid`). It is biased upward at small N: compare at a stated N.
    """
    from cleanfid import fid  # lazy: clean-fid pulls in scipy and PIL

    fa, fb = _as_rows(feat_a, "feat_a").cpu().numpy(), _as_rows(feat_b, "feat_b").cpu().numpy()
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature sets must have the same dimension; got {fa.shape[1]} and {fb.shape[1]}")
    if len(fa) < 2 or len(fb) < 2:
        raise ValueError(f"need at least 2 feature vectors per set; got {len(fa)} and {len(fb)}")
    import numpy as np

    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    sa, sb = np.atleast_2d(np.cov(fa, rowvar=False)), np.atleast_2d(np.cov(fb, rowvar=False))
    with warnings.catch_warnings():  # clean-fid 0.1.35 passes scipy's deprecated `disp` argument
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return float(fid.frechet_distance(mu_a, sa, mu_b, sb))
        except TypeError as e:                         # SciPy >= 1.18 removed `disp`: the same formula, here
            if "disp" not in str(e):
                raise
            return _frechet_from_moments(mu_a, sa, mu_b, sb)


def _frechet_from_moments(mu_a, sa, mu_b, sb, eps: float = 1e-6) -> float:
    """clean-fid's frechet_distance without the `disp` argument that SciPy 1.18 removed: d^2 = |mu_a - mu_b|^2
    + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}), with eps I added to both covariances when the product's square
    root is not finite (clean-fid's fallback) and the real part of the root kept."""
    import numpy as np
    from scipy import linalg

    covmean = linalg.sqrtm(sa.dot(sb))
    if not np.isfinite(covmean).all():
        offset = np.eye(sa.shape[0]) * eps
        covmean = linalg.sqrtm((sa + offset).dot(sb + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff.dot(diff) + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def kid(feat_a: Tensor, feat_b: Tensor, blocks: int = 10) -> tuple[float, float]:
    """Kernel Inception Distance form (Binkowski et al. 2018, Sec. 2.3): the unbiased squared MMD with the cubic
    polynomial kernel k(a, b) = (a.b / D + 1)^3 between feature sets (N_a, D) and (N_b, D). Returns (KID, standard
    error).

    Unlike the Frechet distance it is unbiased: two samples of one distribution give 0 on average at any N, so
    small evaluations can be compared with each other and with a data floor. The value is the U-statistic over all
    pairs (`mmd`'s formula with this kernel); the standard error is std / sqrt(blocks) of the same statistic on
    `blocks` disjoint equal blocks of both sets, which are independent, so it is a conservative (slightly large)
    error bar for the full-sample value. It is KID only with Inception features."""
    a, b = _as_rows(feat_a, "feat_a"), _as_rows(feat_b, "feat_b").to(feat_a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) < 2 * blocks:
        raise ValueError(f"kid with {blocks} blocks needs at least {2 * blocks} feature vectors per set; "
                         f"got {len(a)} and {len(b)}")
    D = a.shape[1]

    def mmd2(u: Tensor, v: Tensor) -> Tensor:
        kuu, kvv, kuv = (u @ u.T / D + 1) ** 3, (v @ v.T / D + 1) ** 3, (u @ v.T / D + 1) ** 3
        m, n = len(u), len(v)
        return ((kuu.sum() - kuu.diagonal().sum()) / (m * (m - 1)) + (kvv.sum() - kvv.diagonal().sum()) / (n * (n - 1))
                - 2 * kuv.mean())

    parts = torch.stack([mmd2(u, v) for u, v in zip(a.chunk(blocks), b.chunk(blocks))])
    return float(mmd2(a, b)), float(parts.std() / blocks ** 0.5)


EVAL_SEEDS = 3   # every compared number: mean and spread over this many evaluation seeds (DESIGN.md, Measurements)


def eval_seeds(seed: int, n: int = EVAL_SEEDS) -> list[int]:
    """The evaluation seeds of a benchmark run with base `seed`: each gives fresh noise and fresh reference samples
    (derive both from it). The first is `seed` itself, so seed 0's draws are those of a single-seed run."""
    return [seed + 1000 * k for k in range(n)]


def swd(x: Tensor, ref: Tensor) -> float:
    """The 2D benchmarks' SWD: 256 fixed directions (seed 0), on CPU copies."""
    return sliced_wasserstein(x.detach().cpu(), ref.detach().cpu(), n_proj=256, seed=0)


def spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of one measurement repeated over evaluation seeds; the course calls two
    numbers different only when their gap exceeds the spread. A single value has spread 0."""
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    if len(v) == 0:
        raise ValueError("spread needs at least one value")
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def cifar10_fid(samples: Tensor, device: str | torch.device = "cpu", batch_size: int = 100,
                split: str = "train") -> float:
    """FID of samples (N, 3, 32, 32) in [-1, 1] against clean-fid's CIFAR-10 reference statistics
    (Parmar et al. 2022, mode "clean": images quantised to uint8 values, bicubic resize to 299, Inception-v3).

    The first call downloads Inception's weights (~100 MB, to /tmp) and the statistics (into clean-fid's
    package folder). Offline this raises `MetricUnavailable`; use `classifier.digits_frechet_distance` (a
    Frechet distance in a small digits classifier's feature space) instead. Published CIFAR-10 FIDs use
    N = 50,000 samples; fewer samples give a higher value.
    """
    import urllib.error

    from cleanfid import fid

    if samples.dim() != 4 or tuple(samples.shape[1:]) != (3, 32, 32):
        raise ValueError(f"cifar10_fid needs samples of shape (N, 3, 32, 32) in [-1, 1]; got {tuple(samples.shape)}")
    n = len(samples)
    images = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()     # (N, 3, 32, 32) in 0..255

    def gen(z: Tensor) -> Tensor:
        """clean-fid calls gen(z) ceil(N / batch_size) times with z (batch_size, z_dim); we hand out the samples
        in order (wrapping around in the last batch, which clean-fid truncates to N)."""
        i = next(batches)
        return images[torch.arange(i * len(z), (i + 1) * len(z)) % n]

    batches = itertools.count()
    try:
        with warnings.catch_warnings():  # clean-fid 0.1.35 passes scipy's deprecated `disp` argument
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(fid.compute_fid(gen=gen, dataset_name="cifar10", dataset_res=32, dataset_split=split,
                                         mode="clean", num_gen=n, batch_size=batch_size,
                                         device=torch.device(device), num_workers=0, use_dataparallel=False,
                                         verbose=False))
    except (urllib.error.URLError, OSError) as e:
        raise MetricUnavailable(
            f"CIFAR-10 FID needs clean-fid's Inception weights and CIFAR-10 statistics, which could not be "
            f"downloaded (offline? {e}). Offline, use course_lib.classifier.digits_frechet_distance on the digits "
            f"dataset (a Frechet distance in a small digits classifier's feature space, not FID).") from e


def pareto_front(cost: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """The Pareto front of N methods, lower better on both axes: a boolean mask (N,), True where no other method is
    at least as good on both axes and strictly better on one (cost (N,), quality (N,); equal points are all kept)."""
    c, q = cost[:, None], quality[:, None]                                    # (N, 1) against (1, N): row i, column j
    dominated = ((cost[None] <= c) & (quality[None] <= q) & ((cost[None] < c) | (quality[None] < q))).any(dim=1)
    return ~dominated
