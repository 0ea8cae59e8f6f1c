"""2D toy data: exact samplers with class labels, and Gaussian mixtures with an exact score and denoiser.

    dataset        classes   what a class is                          std per axis   exact denoiser
    checkerboard   8         which filled square of a 4x4 board       ~1.15          no
    gmm            8         which of 8 Gaussians on a circle         ~1.43          yes (GaussianMixture)
    gmm-overlap    8         which of 8 overlapping Gaussians         ~1.5           yes (classes overlap: Bayes
                                                                                     accuracy ~87%, for guidance)
    two-moons      2         which moon                               ~1.3, ~0.75    no
    spiral         3         which arm                                ~1.0           no

`sample_2d(name, n, generator)` draws (x, y): x (n, 2) float32, y (n,) long. Every sampler is exact (draws
from the stated distribution, no rejection or grid), and all randomness comes from the generator passed in.
Anything that accepts a dataset name also accepts a `GaussianMixture`, the way to define your own data.

Gaussian mixtures stay Gaussian mixtures under every affine process x_t = alpha(t) x0 + sigma(t) eps:

    p_0(x) = sum_k w_k N(x; mu_k, S_k)   =>   p_t(x) = sum_k w_k N(x; alpha mu_k, C_k(t)),   C_k = alpha^2 S_k + sigma^2 I

so the log-density, the score and the posterior mean E[x0 | x_t] (the ideal denoiser, Tweedie's formula)
are all closed-form. `GaussianMixture.denoiser(process)` is therefore an exact teacher: distillation error can be
measured apart from teacher error. Internally everything is computed in float64 (float32 on MPS), with
log-sum-exp for the responsibilities and eigen-coordinates of S_k instead of matrix inverses, so the formulas
stay finite from t = 0 (sigma = 0) to t = 1 (alpha = 0 for rectified flow).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .conditioning import Cond, check, labelled
from .predictions import Pred
from .processes import AffineProcess, as_times

Sampler2D = Callable[[int, torch.Generator | None], tuple[Tensor, Tensor]]  # (n, generator) -> (x (n, 2), y (n,))


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the exact formulas, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"the number of samples n must be an int >= 0; got {n!r}")


# ----------------------------------------------------------------------------------------------------------------
# Gaussian mixtures
# ----------------------------------------------------------------------------------------------------------------

class _Posterior(NamedTuple):
    """Per-component quantities at (x_t, t), all in the working dtype. B samples, K components, D dimensions."""

    log_joint: Tensor  # (B, K) log w_k + log N(x; alpha mu_k, C_k), -inf for components excluded by a label
    alpha: Tensor      # (B, 1, 1)
    sigma: Tensor      # (B, 1, 1)
    r: Tensor          # (B, K, D) U_k^T (x - alpha mu_k): the residual in the eigenbasis of S_k
    c: Tensor          # (B, K, D) eigenvalues of C_k(t): alpha^2 lambda_k + sigma^2


class GaussianMixture:
    """p(x0) = sum_k w_k N(x0; mu_k, S_k), with an exact class label per component.

    Args:
        weights: (K,) nonnegative mixture weights w_k; normalised to sum to one.
        means: (K, D) component means mu_k.
        covariances: (K, D, D) symmetric positive-definite covariances S_k. For isotropic components use
            `GaussianMixture.isotropic(means, std)`.
        component_classes: (K,) long, the class label of each component (default: component k is class k).
            Several components may share a class; classes must be 0..C-1 with none missing.

    Each S_k is diagonalised once, S_k = U_k diag(lambda_k) U_k^T. Since C_k(t) = alpha^2 S_k + sigma^2 I has the
    same eigenvectors, every inverse and log-determinant at every t is a division and a sum of logs.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor,
                 component_classes: Tensor | None = None):
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        mu = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        S = torch.as_tensor(covariances, dtype=torch.float64).detach().cpu()
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {tuple(mu.shape)}")
        K, D = mu.shape
        if w.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},) to match means; got {tuple(w.shape)}")
        if S.shape != (K, D, D):
            raise ValueError(f"covariances must have shape (K, D, D) = ({K}, {D}, {D}); got {tuple(S.shape)}")
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError("weights must be nonnegative with a positive sum")
        if not torch.allclose(S, S.transpose(-1, -2), atol=1e-10):
            raise ValueError("covariances must be symmetric")
        lam, U = torch.linalg.eigh(S)  # (K, D), (K, D, D)
        if (lam <= 0).any():
            raise ValueError("covariances must be positive definite (smallest eigenvalue "
                             f"{float(lam.min()):.3g}); add a small multiple of the identity")
        if component_classes is None:
            component_classes = torch.arange(K)
        cls = torch.as_tensor(component_classes).long().cpu()
        if cls.shape != (K,) or cls.min() < 0 or set(cls.tolist()) != set(range(int(cls.max()) + 1)):
            raise ValueError(f"component_classes must be (K,) = ({K},) labels covering 0..C-1; got {cls.tolist()}")
        self.weights = w / w.sum()       # (K,)
        self.means = mu                  # (K, D)
        self.covariances = S             # (K, D, D)
        self.component_classes = cls     # (K,)
        self._lam, self._U = lam, U      # eigenvalues (K, D) and eigenvectors (K, D, D) of S_k

    @classmethod
    def isotropic(cls, means: Tensor, std: float | Tensor, weights: Tensor | None = None,
                  component_classes: Tensor | None = None) -> "GaussianMixture":
        """Components N(mu_k, std_k^2 I). std: a float or (K,); weights default to uniform."""
        mu = torch.as_tensor(means, dtype=torch.float64)
        K, D = mu.shape
        s = torch.as_tensor(std, dtype=torch.float64).expand(K)
        covs = (s**2)[:, None, None] * torch.eye(D, dtype=torch.float64)
        w = torch.ones(K, dtype=torch.float64) if weights is None else weights
        return cls(w, mu, covs, component_classes)

    # -- sizes and moments ---------------------------------------------------------------------------------------

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes C; label C is the null label of classifier-free guidance."""
        return int(self.component_classes.max()) + 1

    def mean(self) -> Tensor:
        """E[x0] = sum_k w_k mu_k, shape (D,), float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x0] = sum_k w_k (S_k + mu_k mu_k^T) - E[x0] E[x0]^T (law of total covariance), shape (D, D)."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covariances + self.means[:, :, None] * self.means[:, None])
        return second - torch.outer(m, m)

    def marginal(self, t: float, process: AffineProcess) -> "GaussianMixture":
        """The mixture p_t of x_t at one time t: means alpha mu_k, covariances alpha^2 S_k + sigma^2 I."""
        tt = torch.tensor([float(t)], dtype=torch.float64)
        a, s = float(process.alpha(tt)), float(process.sigma(tt))
        covs = a**2 * self.covariances + s**2 * torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, covs, self.component_classes)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, D={self.dim}, classes={self.num_classes})"

    # -- sampling ------------------------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Exact samples: k ~ Categorical(w), x0 = mu_k + U_k diag(sqrt(lambda_k)) z, z ~ N(0, I).

        Returns x0 (n, D) of `dtype` and class labels y (n,) long (on the CPU, like the generator)."""
        _check_n(n)
        k = (torch.multinomial(self.weights, n, replacement=True, generator=generator) if n > 0
             else torch.zeros(0, dtype=torch.long))                                          # (n,) components
        return self.sample_components(k, generator, dtype), self.component_classes[k]

    def sample_components(self, k: Tensor, generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float32) -> Tensor:
        """One exact draw x0 = mu_k + U_k diag(sqrt(lambda_k)) z, z ~ N(0, I), from each component k (n,): (n, D)."""
        z = torch.randn(len(k), self.dim, generator=generator, dtype=torch.float64)         # (n, D)
        x = self.means[k] + torch.einsum("nij,nj->ni", self._U[k], self._lam[k].sqrt() * z)
        return x.to(dtype)

    # -- the exact formulas --------------------------------------------------------------------------------------

    def _posterior(self, x: Tensor, t: float | Tensor | None, process: AffineProcess | None,
                   y: Tensor | None) -> _Posterior:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}); got {tuple(x.shape)}")
        wd = _work_dtype(x.device)
        xw = x.to(wd)
        if t is None:                          # the data density: alpha = 1, sigma = 0
            a = torch.ones(len(x), dtype=wd, device=x.device)
            s = torch.zeros_like(a)
        else:
            if process is None:
                raise ValueError("a time t needs the process it refers to: pass process=... (e.g. RectifiedFlow())")
            tt = as_times(t, xw)
            if tt.shape != (len(x),):
                raise ValueError(f"t must be a float or have shape (B,) = ({len(x)},); got {tuple(tt.shape)}")
            a, s = process.alpha(tt).to(wd), process.sigma(tt).to(wd)
        mu, lam, U = (v.to(device=x.device, dtype=wd) for v in (self.means, self._lam, self._U))
        a3, s3 = a[:, None, None], s[:, None, None]                          # (B, 1, 1)
        r = torch.einsum("kdj,bkd->bkj", U, xw[:, None, :] - a3 * mu)         # (B, K, D), U_k^T (x - alpha mu_k)
        c = a3**2 * lam + s3**2                                               # (B, K, D)
        log_n = -0.5 * (self.dim * math.log(2 * math.pi) + torch.log(c).sum(-1) + (r**2 / c).sum(-1))  # (B, K)
        log_joint = torch.log(self.weights.to(device=x.device, dtype=wd)) + log_n
        if y is not None:
            log_joint = self._condition(log_joint, y)
        return _Posterior(log_joint, a3, s3, r, c)

    def _condition(self, log_joint: Tensor, y: Tensor) -> Tensor:
        """Keep only the components of class y_b in row b, renormalised by the class weight (log p(x, k | y));
        rows with the null label y_b = C stay unconditional."""
        C = self.num_classes
        y = torch.as_tensor(y, device=log_joint.device).long().reshape(-1)
        if y.numel() == 1:
            y = y.expand(log_joint.shape[0])
        if y.shape != log_joint.shape[:1]:
            raise ValueError(f"labels y must have shape (B,) = ({log_joint.shape[0]},); got {tuple(y.shape)}")
        if ((y < 0) | (y > C)).any():
            raise ValueError(f"labels must be in 0..{C - 1}, or {C} for the null (unconditional) label; "
                             f"got values {sorted(set(y.tolist()))}")
        cls = self.component_classes.to(log_joint.device)
        keep = (cls[None, :] == y[:, None]) | (y[:, None] == C)                          # (B, K)
        log_w = torch.log(self.weights.to(log_joint))
        log_w_class = torch.logsumexp(torch.where(keep, log_w, -math.inf), dim=1, keepdim=True)  # (B, 1)
        return torch.where(keep, log_joint - log_w_class, -math.inf)

    def log_prob(self, x: Tensor, t: float | Tensor | None = None, process: AffineProcess | None = None,
                 y: Tensor | None = None) -> Tensor:
        """log p_t(x) = logsumexp_k [log w_k + log N(x; alpha mu_k, C_k(t))], shape (B,), in x's dtype.

        t None: the data density p_0. With labels y (B,): the class-conditional log p_t(x | y)."""
        post = self._posterior(x, t, process, y)
        return torch.logsumexp(post.log_joint, dim=1).to(x.dtype)

    def responsibilities(self, x: Tensor, t: float | Tensor | None = None, process: AffineProcess | None = None,
                         y: Tensor | None = None) -> Tensor:
        """gamma_k(x_t) = p(k | x_t), shape (B, K), a softmax of the log-joint (log-sum-exp stable)."""
        return torch.softmax(self._posterior(x, t, process, y).log_joint, dim=1).to(x.dtype)

    def posterior_class_probs(self, x: Tensor) -> Tensor:
        """p(class | x0) for clean points x0 (B, D): responsibilities at t = 0 summed per class, shape (B, C).
        `argmax(-1)` is the Bayes-optimal classifier, used to measure class accuracy of generated samples."""
        gamma = self.responsibilities(x)                                              # (B, K)
        out = torch.zeros(len(x), self.num_classes, dtype=gamma.dtype, device=gamma.device)
        return out.index_add_(1, self.component_classes.to(x.device), gamma)

    def score(self, x: Tensor, t: float | Tensor, process: AffineProcess, y: Tensor | None = None) -> Tensor:
        """grad_x log p_t(x) = -sum_k gamma_k C_k^{-1} (x - alpha mu_k), shape (B, D), in x's dtype."""
        post = self._posterior(x, t, process, y)
        gamma = torch.softmax(post.log_joint, dim=1)                                   # (B, K)
        U = self._U.to(post.r)
        per_k = torch.einsum("kdj,bkj->bkd", U, post.r / post.c)                       # (B, K, D), C_k^{-1}(x - a mu_k)
        return -(gamma[..., None] * per_k).sum(1).to(x.dtype)

    def posterior_mean(self, x: Tensor, t: float | Tensor, process: AffineProcess,
                       y: Tensor | None = None) -> Pred:
        """The ideal denoiser: Pred(E[x0 | x_t], E[eps | x_t]), each (B, D) in x's dtype.

        Per component (Gaussian conditioning; equivalently Tweedie's formula x0 = (x + sigma^2 score) / alpha):
            E[x0 | x_t, k]  = mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)
            E[eps | x_t, k] = sigma C_k^{-1} (x_t - alpha mu_k)          (= (x_t - alpha E[x0 | x_t, k]) / sigma)
        both averaged with the responsibilities gamma_k(x_t). The eps form has no division by sigma, so t = 0 is safe,
        and alpha x0 + sigma eps = x_t holds exactly since alpha^2 S_k + sigma^2 I = C_k.
        """
        post = self._posterior(x, t, process, y)
        gamma = torch.softmax(post.log_joint, dim=1)[..., None]                        # (B, K, 1)
        U = self._U.to(post.r)
        lam, mu = self._lam.to(post.r), self.means.to(post.r)
        a, s = post.alpha, post.sigma                                                  # (B, 1, 1)
        x0_k = mu + torch.einsum("kdj,bkj->bkd", U, a * lam * post.r / post.c)         # (B, K, D)
        eps_k = torch.einsum("kdj,bkj->bkd", U, s * post.r / post.c)                   # (B, K, D)
        return Pred((gamma * x0_k).sum(1).to(x.dtype), (gamma * eps_k).sum(1).to(x.dtype))

    def denoiser(self, process: AffineProcess, label: int | None = None) -> "ExactDenoiser":
        """The exact model `model(x, t, cond=None) -> Pred(x0, eps)` for this mixture under `process`.

        label: fix a class for every call (the exact class-conditional teacher p(x0 | y = label)); otherwise pass
        y (B,) per call, with y = num_classes meaning unconditional, so `guidance.cfg(model, w, num_classes)` works.
        """
        if label is not None and not 0 <= int(label) <= self.num_classes:
            raise ValueError(f"label must be in 0..{self.num_classes - 1} (or {self.num_classes} = unconditional); "
                             f"got {label}")
        return ExactDenoiser(self, process, label)


class ExactDenoiser:
    """The ideal denoiser of a GaussianMixture as a course model: model(x, t, cond=None) -> Pred(x0, eps).

    x (B, D), t a float or (B,), cond an optional Cond of (B,) labels (overrides the fixed `label`)."""

    def __init__(self, mixture: GaussianMixture, process: AffineProcess, label: int | None = None):
        self.mixture, self.process, self.label = mixture, process, label

    def __call__(self, x: Tensor, t: float | Tensor, cond: Cond | None = None) -> Pred:
        if check(cond) is not None and cond.s is not None:
            raise ValueError("the exact denoiser is no flow map: it takes no end time s (Cond.s); the exact flow map "
                             "is distill.flowmap.exact_flow_map (or ExactFlowMap, a model whose jump is it)")
        y = None if check(cond) is None else cond.y
        if y is None and self.label is not None:
            y = torch.full((len(x),), int(self.label), dtype=torch.long, device=x.device)
        return self.mixture.posterior_mean(x, t, self.process, y)

    def __repr__(self) -> str:
        return f"ExactDenoiser({self.mixture!r}, {self.process!r}, label={self.label})"


def gaussian_flow_map(mixture: GaussianMixture, x: Tensor, t: float | Tensor, s: float | Tensor,
                      process: AffineProcess) -> Tensor:
    """Exact probability-flow ODE solution x_t -> x_s for Gaussian data (a one-component mixture N(mu, S)).

    Along each eigenvector of S the ODE dx/dt = alpha' x0_hat + sigma' eps_hat reads
    d/dt (x - alpha mu) = (c'/2c)(x - alpha mu) with c = alpha^2 lambda + sigma^2, hence
        x_s = alpha_s mu + U diag(sqrt(c(s) / c(t))) U^T (x_t - alpha_t mu)          (std_s / std_t per axis).
    Shapes: x (B, D); t, s floats or (B,). Returns (B, D) in x's dtype.
    """
    if mixture.num_components != 1:
        raise ValueError(f"the closed-form flow map needs a single Gaussian; this mixture has "
                         f"{mixture.num_components} components (integrate the ODE with a sampler instead)")
    wd = _work_dtype(x.device)
    xw = x.to(wd)
    tt, ss = as_times(t, xw), as_times(s, xw)
    mu, lam, U = (v.to(device=x.device, dtype=wd)[0] for v in (mixture.means, mixture._lam, mixture._U))
    a_t, s_t = process.alpha(tt).to(wd)[:, None], process.sigma(tt).to(wd)[:, None]   # (B, 1)
    a_s, s_s = process.alpha(ss).to(wd)[:, None], process.sigma(ss).to(wd)[:, None]
    ratio = torch.sqrt((a_s**2 * lam + s_s**2) / (a_t**2 * lam + s_t**2))              # (B, D)
    r = (xw - a_t * mu) @ U                                                             # (B, D) eigen-coordinates
    return (a_s * mu + (ratio * r) @ U.T).to(x.dtype)


def gmm8(radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """Eight equally weighted isotropic Gaussians N(mu_k, std^2 I), mu_k = radius (cos 2 pi k/8, sin 2 pi k/8);
    class = mode k. Per-axis data std is sqrt(radius^2 / 2 + std^2) (about 1.43 with the defaults)."""
    ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)   # (8, 2)
    return GaussianMixture.isotropic(means, std)


# ----------------------------------------------------------------------------------------------------------------
# Other toy datasets (exact samplers, no density)
# ----------------------------------------------------------------------------------------------------------------

def checkerboard(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Uniform on the 8 filled unit squares of a 4x4 board on [-2, 2]^2: cell (i, j) (column i, row j, from the
    lower left) is filled when i + j is even. Class = index of the filled square, 0..7 in row-major order."""
    _check_n(n)
    cells = torch.tensor([(i, j) for j in range(4) for i in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
    y = torch.randint(len(cells), (n,), generator=generator)                   # (n,)
    u = torch.rand(n, 2, generator=generator)                                   # (n, 2), position inside the cell
    return cells[y] - 2.0 + u, y


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05,
              scale: float = 1.5) -> tuple[Tensor, Tensor]:
    """Two interleaved half circles (the scikit-learn "moons" shape), centred and scaled by `scale`:
    class 0: (cos th, sin th), class 1: (1 - cos th, 1/2 - sin th), th ~ U(0, pi), plus N(0, noise^2 I),
    then x <- scale (x - (1/2, 1/4)). Per-axis std about (1.3, 0.75) with the defaults."""
    _check_n(n)
    y = torch.randint(2, (n,), generator=generator)                            # (n,)
    th = math.pi * torch.rand(n, generator=generator)
    upper = torch.stack([torch.cos(th), torch.sin(th)], dim=1)                  # (n, 2)
    lower = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], dim=1)
    x = torch.where(y[:, None] == 0, upper, lower) + noise * torch.randn(n, 2, generator=generator)
    return scale * (x - torch.tensor([0.5, 0.25])), y


def spiral(n: int, generator: torch.Generator | None = None, arms: int = 3, turns: float = 1.0,
           radius: float = 2.5, noise: float = 0.08) -> tuple[Tensor, Tensor]:
    """`arms` interleaved spiral arms; class = arm. For arm k and u ~ U(0, 1): r = radius u,
    angle = 2 pi (k / arms + turns u), plus N(0, noise^2 I). Per-axis std about radius / sqrt(6) (~1.0)."""
    _check_n(n)
    y = torch.randint(arms, (n,), generator=generator)                         # (n,)
    u = torch.rand(n, generator=generator)
    ang = 2 * math.pi * (y / arms + turns * u)
    x = radius * u[:, None] * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    return x + noise * torch.randn(n, 2, generator=generator), y


def _gmm8_sample(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    return gmm8().sample(n, generator)


OVERLAP_STD = 0.5  # neighbouring means are 2 * 2 sin(pi/8) = 1.53 apart, about 3 std: the classes overlap


def gmm8_overlap() -> GaussianMixture:
    """gmm8 with std 0.5: neighbouring classes overlap, so the Bayes-optimal classifier is right only ~87% of the
    time on exact samples. Guidance (notebook 02) visibly raises the class accuracy of samples above that."""
    return gmm8(radius=2.0, std=OVERLAP_STD)


def _gmm8_overlap_sample(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    return gmm8_overlap().sample(n, generator)


def sample_conditional(mixture: GaussianMixture, y: Tensor, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact samples x0 (n, D) of p(x0 | y_i), one per label of y (n,): a component of class y_i drawn with the
    mixture weights renormalised within the class, then a Gaussian draw from it."""
    y = torch.as_tensor(y).long().cpu().reshape(-1)
    if len(y) and ((y < 0) | (y >= mixture.num_classes)).any():
        raise ValueError(f"labels must be in 0..{mixture.num_classes - 1}; got {sorted(set(y.tolist()))}")
    w = torch.where(mixture.component_classes[None, :] == y[:, None], mixture.weights[None, :], 0.0)  # (n, K)
    k = (torch.multinomial(w, 1, generator=generator)[:, 0] if len(y) else torch.zeros(0, dtype=torch.long))
    return mixture.sample_components(k, generator, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dataset2D:
    """A named toy dataset: an exact sampler (n, generator) -> (x (n, 2), y (n,)), its number of classes, and the
    GaussianMixture behind it when it has one (then an exact denoiser exists)."""

    sample: Sampler2D
    num_classes: int
    description: str
    mixture: Callable[[], GaussianMixture] | None = None


DATASETS_2D: dict[str, Dataset2D] = {
    "checkerboard": Dataset2D(checkerboard, 8, "uniform on 8 squares of a 4x4 board on [-2, 2]^2"),
    "gmm": Dataset2D(_gmm8_sample, 8, "8 Gaussians on a circle, gmm8()", gmm8),
    "gmm-overlap": Dataset2D(_gmm8_overlap_sample, 8, "8 overlapping Gaussians on a circle, gmm8_overlap()",
                             gmm8_overlap),
    "two-moons": Dataset2D(two_moons, 2, "two interleaved half circles"),
    "spiral": Dataset2D(spiral, 3, "three spiral arms"),
}

Data2D = str | GaussianMixture  # a registered name, or your own mixture


def _get(name: str) -> Dataset2D:
    if not isinstance(name, str) or name not in DATASETS_2D:
        raise ValueError(f"unknown 2D dataset {name!r}; valid names: {', '.join(DATASETS_2D)} "
                         "(or pass a GaussianMixture)")
    return DATASETS_2D[name]


def sample_2d(name: Data2D, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """n exact samples of a toy dataset: x (n, 2) float32 and class labels y (n,) long, on the CPU."""
    if isinstance(name, GaussianMixture):
        return name.sample(n, generator)
    x, y = _get(name).sample(n, generator)
    return x.float(), y.long()


def batches(name: Data2D, labels: bool = False) -> Callable[[int, torch.Generator], dict]:
    """The toy dataset as a course data source: (n, g) -> {"x": x0 (n, 2)}, with labels {"x": x0, "cond":
    conditioning.labels(y, num_classes(name))}. The engine moves each batch to the model's device."""
    if labels:
        return labelled(lambda n, g: sample_2d(name, n, g), num_classes(name))
    return lambda n, g: {"x": sample_2d(name, n, g)[0]}


def num_classes(name: Data2D) -> int:
    """Number of classes C of a dataset (labels are 0..C-1; C itself is the null label for guidance)."""
    return name.num_classes if isinstance(name, GaussianMixture) else _get(name).num_classes


def get_mixture(name: Data2D) -> GaussianMixture:
    """The GaussianMixture behind a dataset; a clear error for datasets that have none."""
    if isinstance(name, GaussianMixture):
        return name
    ds = _get(name)
    if ds.mixture is None:
        exact = [k for k, v in DATASETS_2D.items() if v.mixture is not None]
        raise ValueError(f"dataset {name!r} has no closed-form density or denoiser; datasets with one: "
                         f"{', '.join(exact)} (or build a GaussianMixture). For {name!r}, train a teacher instead.")
    return ds.mixture()


def exact_denoiser(name: Data2D, process: AffineProcess, label: int | None = None) -> ExactDenoiser:
    """The exact posterior-mean model of a dataset under `process` (see GaussianMixture.denoiser)."""
    return get_mixture(name).denoiser(process, label)
