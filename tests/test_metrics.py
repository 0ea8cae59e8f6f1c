"""Metrics against analytic truth: Gaussian sample distances, straight and circular paths, Gaussian entropies."""
import math
import os
import urllib.error
import urllib.request

import pytest
import torch

from course_lib import metrics
from course_lib.metrics import (MetricUnavailable, flow_map_error, frechet_distance, gmm_class_accuracy, gmm_nll,
                                mmd, projections, sliced_wasserstein, straightness)

torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- sliced Wasserstein ----------------------------------------------------------------------------------------------

def test_projections_are_fixed_unit_vectors():
    p = projections(3, 64, seed=1)
    assert p.shape == (64, 3)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(p, projections(3, 64, seed=1))
    assert not torch.allclose(p, projections(3, 64, seed=2))


def test_sw_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 2, generator=gen())
    assert sliced_wasserstein(x, x) == 0.0


def test_sw_is_permutation_invariant():
    g = gen(1)
    x, y = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g) + 0.3
    perm = torch.randperm(400, generator=g)
    assert sliced_wasserstein(x[perm], y) == pytest.approx(sliced_wasserstein(x, y), rel=1e-12)
    assert sliced_wasserstein(x, y[perm]) == pytest.approx(sliced_wasserstein(x, y), rel=1e-12)


def test_sw_between_shifted_gaussians():
    # Slices of N(0, I) and N(m, I) along theta are N(0, 1) and N(theta.m, 1): W_2^2 = (theta.m)^2, and
    # E_theta (theta.m)^2 = |m|^2 / 2 for theta uniform on the circle, so SW_2 = |m| / sqrt(2).
    g = gen(2)
    m = torch.tensor([1.5, -1.0])
    x, y = torch.randn(10000, 2, generator=g), torch.randn(10000, 2, generator=g) + m
    expected = float(m.norm()) / math.sqrt(2)
    assert sliced_wasserstein(x, y, n_proj=1024) == pytest.approx(expected, rel=0.03)
    # exact quadrature over evenly spaced directions
    ang = torch.arange(180) * math.pi / 180
    even = torch.stack([ang.cos(), ang.sin()], dim=1)
    assert sliced_wasserstein(x, y, directions=even) == pytest.approx(expected, rel=0.02)


def test_sw_needs_equal_sample_counts():
    with pytest.raises(ValueError, match="same number of samples"):
        sliced_wasserstein(torch.zeros(10, 2), torch.zeros(11, 2))


def test_sw_flattens_images():
    x = torch.randn(50, 1, 4, 4, generator=gen(3))
    assert sliced_wasserstein(x, x + 1.0, n_proj=8) > 0


# -- MMD ---------------------------------------------------------------------------------------------------------------

def test_mmd_same_distribution_near_zero_and_shifted_positive():
    g = gen(4)
    x, y = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    same = mmd(x, y)
    shifted = mmd(x, y + torch.tensor([1.0, 0.0]))
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(same)


def test_mmd_is_unbiased_for_a_single_kernel():
    # Direct O(N^2) formula with one bandwidth, different sample sizes.
    g = gen(5)
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    k = lambda a, b: torch.exp(-torch.cdist(a, b) ** 2 / (2 * 0.7**2))  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = ((kxx.sum() - kxx.trace()) / (30 * 29) + (kyy.sum() - kyy.trace()) / (20 * 19) - 2 * kxy.mean())
    assert mmd(x, y, bandwidths=(0.7,)) == pytest.approx(float(direct), rel=1e-10)
    # blocks of rows give the same sum
    assert float(metrics._rbf_sum(x, x, (0.7,), True, block=7)) == pytest.approx(float(kxx.sum() - kxx.trace()))


# -- GMM likelihood ------------------------------------------------------------------------------------------------------

def _mixture():
    from course_lib.data2d import GaussianMixture

    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5]], dtype=torch.float64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.1]]], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    return GaussianMixture(weights, means, covs), weights, means, covs


def test_gmm_nll_matches_direct_computation():
    gmm, w, mu, S = _mixture()
    x = torch.randn(300, 2, generator=gen(6), dtype=torch.float64) * 2
    comps = [torch.distributions.MultivariateNormal(mu[k], S[k]).log_prob(x) + w[k].log() for k in range(2)]
    direct = -torch.logsumexp(torch.stack(comps, dim=1), dim=1).mean()
    assert gmm_nll(x, gmm) == pytest.approx(float(direct), rel=1e-8)


def test_gmm_nll_of_own_samples_is_the_entropy():
    # One isotropic Gaussian N(mu, s^2 I) in 2D: H = log(2 pi e s^2).
    from course_lib.data2d import GaussianMixture

    s = 0.4
    gmm = GaussianMixture(torch.ones(1), torch.tensor([[1.0, -1.0]]), s**2 * torch.eye(2)[None])
    x = torch.tensor([1.0, -1.0]) + s * torch.randn(20000, 2, generator=gen(7))
    assert gmm_nll(x, gmm) == pytest.approx(math.log(2 * math.pi * math.e * s**2), abs=0.02)


def test_gmm_class_accuracy():
    gmm, *_ = _mixture()
    x = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [-2.1, 0.1]])
    assert gmm_class_accuracy(x, torch.tensor([0, 1, 0]), gmm) == 1.0
    assert gmm_class_accuracy(x, torch.tensor([1, 1, 1]), gmm) == pytest.approx(1 / 3)


# -- flow-map error and straightness ---------------------------------------------------------------------------------

def test_flow_map_error_is_rms_distance():
    x = torch.randn(10, 3, generator=gen(8))
    d = torch.tensor([3.0, 0.0, 4.0])
    assert flow_map_error(x + d, x) == pytest.approx(5.0, rel=1e-6)
    assert flow_map_error(x, x) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        flow_map_error(x, x[:5])


def test_straightness_of_a_straight_constant_speed_path_is_zero():
    ts = torch.linspace(1, 0, 11)
    x1, x0 = torch.randn(4, 2, generator=gen(9)), torch.randn(4, 2, generator=gen(10))
    path = ts[:, None, None] * x1 + (1 - ts[:, None, None]) * x0                  # (11, 4, 2)
    assert straightness(path, ts) == pytest.approx(0.0, abs=1e-10)
    # also on a non-uniform grid, and for images (n+1, B, C, H, W)
    ts2 = torch.tensor([1.0, 0.9, 0.5, 0.45, 0.0])
    img1, img0 = torch.randn(3, 1, 4, 4, generator=gen(11)), torch.randn(3, 1, 4, 4, generator=gen(12))
    path2 = ts2.view(-1, 1, 1, 1, 1) * img1 + (1 - ts2.view(-1, 1, 1, 1, 1)) * img0
    assert straightness(path2, ts2) == pytest.approx(0.0, abs=1e-10)


def test_straightness_of_a_quarter_circle():
    # Z(t) = R (cos phi, sin phi), phi = (pi/2)(1 - t), t from 1 to 0: speed R pi/2, mean velocity (Z_end - Z_start)
    # of norm R sqrt(2). S = E|v|^2 - |v_bar|^2 = R^2 (pi^2/4 - 2). With n chords of angle pi/(2n) traversed in 1/n:
    # |v_i| = 2 R n sin(pi/(4n)), so the discrete value is 4 R^2 n^2 sin^2(pi/(4n)) - 2 R^2.
    R, n = 1.7, 200
    ts = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    phi = math.pi / 2 * (1 - ts)
    path = R * torch.stack([phi.cos(), phi.sin()], dim=-1)[:, None]                 # (n+1, 1, 2)
    discrete = 4 * R**2 * n**2 * math.sin(math.pi / (4 * n)) ** 2 - 2 * R**2
    assert straightness(path, ts) == pytest.approx(discrete, rel=1e-9)
    assert straightness(path, ts) == pytest.approx(R**2 * (math.pi**2 / 4 - 2), rel=1e-4)


def test_straightness_of_a_straight_path_at_varying_speed():
    # Z = x0 + d s^2 with s = 1 - t: velocity 2 s d, E|v|^2 = 4/3 |d|^2, |v_bar|^2 = |d|^2, so S = |d|^2 / 3 > 0.
    ts = torch.linspace(1, 0, 2001, dtype=torch.float64)
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    path = ((1 - ts) ** 2)[:, None, None] * d                                       # (n+1, 1, 2)
    assert straightness(path, ts) == pytest.approx(5.0 / 3, rel=1e-5)


def test_straightness_rejects_bad_grids():
    with pytest.raises(ValueError, match="monotone"):
        straightness(torch.zeros(3, 2, 2), torch.tensor([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="n\\+1"):
        straightness(torch.zeros(3, 2, 2), torch.tensor([1.0, 0.0]))


# -- Frechet distance and FID ------------------------------------------------------------------------------------------

def test_frechet_distance_of_isotropic_gaussians():
    # N(mu1, s1^2 I) vs N(mu2, s2^2 I) in D dims: |mu1 - mu2|^2 + D (s1 - s2)^2.
    g, D = gen(13), 3
    mu = torch.tensor([1.0, 0.0, -0.5])
    a = torch.randn(20000, D, generator=g)
    b = mu + 2.0 * torch.randn(20000, D, generator=g)
    expected = float(mu.pow(2).sum()) + D * (1.0 - 2.0) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_survives_scipy_without_disp(monkeypatch):
    # SciPy 1.18 removed sqrtm's `disp`, which clean-fid 0.1.35 passes: the course's own formula takes over and
    # gives clean-fid's number (measured against clean-fid on this SciPy, then with `disp` refused)
    import scipy.linalg

    g = gen(5)
    a, b = torch.randn(300, 6, generator=g), 0.5 + 1.5 * torch.randn(300, 6, generator=g)
    reference = frechet_distance(a, b)
    sqrtm = scipy.linalg.sqrtm

    def new_sqrtm(A, **kwargs):
        if "disp" in kwargs:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        out = sqrtm(A, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    monkeypatch.setattr(scipy.linalg, "sqrtm", new_sqrtm)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)


def test_cifar10_fid_offline_raises_metric_unavailable(monkeypatch):
    if os.path.exists("/tmp/inception-2015-12-05.pt"):
        pytest.skip("Inception weights are cached here; the offline path cannot be exercised cheaply")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MetricUnavailable, match="digits_frechet_distance"):
        metrics.cifar10_fid(torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match="3, 32, 32"):
        metrics.cifar10_fid(torch.zeros(4, 1, 16, 16))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cifar10_fid_feeds_clean_fid_every_sample_once(monkeypatch):
    # Inception and the reference statistics replaced by fakes: checks batching (5 samples in batches of 2),
    # the [-1, 1] -> 0..255 conversion, and that the statistics requested are CIFAR-10's at 32x32.
    import numpy as np
    from cleanfid import fid

    seen, requested = [], {}

    def fake_extractor(mode, device, use_dataparallel=True):
        def features(batch):                              # (B, 3, 299, 299) float in [0, 255]
            seen.append(batch.clone())
            return batch.mean(dim=(2, 3))                 # (B, 3)
        return features

    def fake_stats(name, res, mode="clean", model_name="inception_v3", seed=0, split="test", metric="FID"):
        requested.update(name=name, res=res, mode=mode, split=split)
        return np.zeros(3), np.eye(3)

    monkeypatch.setattr(fid, "build_feature_extractor", fake_extractor)
    monkeypatch.setattr(fid, "get_reference_statistics", fake_stats)
    samples = torch.rand(5, 3, 32, 32, generator=gen(14)) * 2 - 1
    value = metrics.cifar10_fid(samples, batch_size=2)
    assert requested == {"name": "cifar10", "res": 32, "mode": "clean", "split": "train"}
    images = torch.cat(seen)[:5]                         # the last batch wraps around; clean-fid keeps the first 5
    assert images.shape == (5, 3, 299, 299)
    expected_means = ((samples + 1) * 127.5).round().mean(dim=(2, 3))
    torch.testing.assert_close(images.mean(dim=(2, 3)), expected_means, atol=1.0, rtol=0)
    feats = images.mean(dim=(2, 3)).double().numpy()
    direct = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), np.zeros(3), np.eye(3))
    assert value == pytest.approx(float(direct), rel=1e-6)


# --- precision/recall, in_squares, KID, spread (measurement rules of the second edition) ---------------------

def test_precision_recall_separates_blur_from_dropped_modes():
    from course_lib.data2d import sample_2d
    from course_lib.metrics import precision_recall

    g = torch.Generator().manual_seed(0)
    ref, y = sample_2d("gmm", 2000, g)
    same, _ = sample_2d("gmm", 2000, g)
    p, r = precision_recall(same, ref)
    assert p > 0.9 and r > 0.9                                   # exact samples: both high
    blurred = same + 1.0 * torch.randn(same.shape, generator=g)  # off the modes: precision falls, recall stays
    pb, rb = precision_recall(blurred, ref)
    assert pb < 0.6 and rb > 0.8
    half = ref[y < 4]                                            # half the modes dropped: recall falls
    ph, rh = precision_recall(half[:1000], ref)
    assert ph > 0.9 and rh < 0.6


def test_in_squares_is_one_on_exact_samples_and_half_on_uniform_board():
    from course_lib.data2d import sample_2d
    from course_lib.metrics import in_squares

    g = torch.Generator().manual_seed(1)
    assert in_squares(sample_2d("checkerboard", 5000, g)[0]) == 1.0
    uniform = torch.rand(20000, 2, generator=g) * 4 - 2
    assert abs(in_squares(uniform) - 0.5) < 0.02
    assert in_squares(torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [5.0, 5.0]])) == pytest.approx(1 / 3)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_otherwise():
    from course_lib.metrics import kid

    g = torch.Generator().manual_seed(2)
    values = [kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g))[0] for _ in range(30)]
    mean = sum(values) / len(values)
    _, se = kid(torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g))
    assert abs(mean) < 2 * se                                    # unbiased: averages to 0 (Frechet would not)
    shifted, se2 = kid(torch.randn(400, 8, generator=g) + 0.5, torch.randn(400, 8, generator=g))
    assert shifted > 4 * se2 > 0                                # a real difference stands out of its error bar


def test_spread():
    from course_lib.metrics import spread

    assert spread([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert spread([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        spread([])
