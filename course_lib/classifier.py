"""A small digits classifier: class accuracy of generated digits, and an offline Frechet distance in its features.

    clf = load_digits_classifier()              shipped in data/digits_classifier/ (~0.75 MB, safetensors + JSON)
    class_accuracy(x, labels)                   fraction of images (N, 1, 16, 16) classified as their label
    digits_frechet_distance(samples)            Frechet distance to the reference half of the real digits (features)

The Frechet distance here is NOT FID: FID uses Inception-v3 features of natural images. This one uses the
128-d penultimate (pre-ReLU) features of a 190k-parameter CNN trained on 1500 scikit-learn digits, so its values are
comparable only with each other, inside the course, at the same sample count. Recreate the weights with

    python -m course_lib.classifier train
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import paths
from .checkpoint import CheckpointError, load_tensors, save_tensors
from .config import seeded
from .images import batch_sampler, load_digits
from .metrics import frechet_distance, kid
from .train import TrainConfig, train

CLASSIFIER_DIR = paths.data_dir() / "digits_classifier"   # see course_lib.paths
RECREATE = "python -m course_lib.classifier train"
IMAGE_SHAPE = (1, 16, 16)


class DigitsCNN(nn.Module):
    """x (N, 1, 16, 16) in [-1, 1] -> logits (N, 10); `features(x)` -> (N, 128) penultimate features.

    The features are the fc layer's pre-activations (the head sees their ReLU): after a ReLU about a quarter of
    the 128 units are zero on every digit, which would make the feature covariance singular for the Frechet
    distance; before it, the covariance is full rank.
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),                  # (N, 32, 16, 16)
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),       # (N, 64, 8, 8)
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),       # (N, 64, 4, 4)
        )
        self.fc = nn.Linear(64 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "feature_dim": self.feature_dim}

    def features(self, x: Tensor) -> Tensor:
        _check_images(x)
        return self.fc(self.conv(x).flatten(1))                         # (N, feature_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.features(x)))                      # (N, num_classes)


def _check_images(x: Tensor) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"the digits classifier takes images of shape (N, 1, 16, 16) in [-1, 1]; got "
                         f"{tuple(x.shape)}. Load digits with images.load_digits(16) or resize with "
                         f"F.interpolate(x, size=16, mode='bilinear').")


def augment(x: Tensor, generator: torch.Generator, noise_std: float = 0.05) -> Tensor:
    """Random shifts of -1, 0 or +1 pixel per axis (background -1 fills in) plus Gaussian noise: (N, 1, H, W)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)                                   # (N, 1, H+2, W+2)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator, device=generator.device).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)                         # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)                         # (N, W)
    shifted = padded[torch.arange(n, device=x.device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    return shifted[:, None] + noise_std * noise


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(augment(x, generator)), y, reduction="none")    # (B,)


@torch.no_grad()
def _predict(classifier: nn.Module, x: Tensor, fn: str, batch: int = 1024) -> Tensor:
    _check_images(x)
    device = next(classifier.parameters()).device
    out = [getattr(classifier, fn)(x[i:i + batch].to(device, torch.float32)) for i in range(0, len(x), batch)]
    return torch.cat(out)


def train_digits_classifier(cfg: TrainConfig | None = None, out_dir: str | os.PathLike | None = CLASSIFIER_DIR,
                            progress: bool = True) -> tuple[DigitsCNN, float]:
    """Train on the "train" split (1500 digits, augmented), evaluate on "test" (297); returns (model, accuracy).

    Writes out_dir/{model.safetensors, config.json} (EMA weights, test accuracy in config.json) unless out_dir
    is None. About half a minute on one CPU thread with the default config.
    """
    cfg = cfg or TrainConfig(steps=1500, batch_size=128, lr=2e-3, lr_schedule="cosine", warmup=50,
                             ema_decay=0.995, weight_decay=1e-4, seed=0, desc="digits classifier")
    with seeded(cfg.seed):  # seeded initial weights, global RNG state left untouched
        model = DigitsCNN()
    x, y = load_digits(16, "train")
    state = train(model, _loss, batch_sampler(x, y), cfg, progress=progress)
    best = state.best().eval()
    x_test, y_test = load_digits(16, "test")
    acc = class_accuracy(x_test, y_test, best)
    if out_dir is not None:
        config = {"arch": "digits_cnn", "model": best.config(), "test_accuracy": acc, "test_images": len(x_test),
                  "data": "sklearn digits, 16x16, split 'train' (first 1500)", "train_config": asdict(cfg),
                  "augmentation": "shift +-1 px, noise std 0.05", "recreate": RECREATE}
        save_tensors(out_dir, best.state_dict(), config)
    return best, acc


def load_digits_classifier(device: str | torch.device = "cpu",
                           folder: str | os.PathLike = CLASSIFIER_DIR) -> DigitsCNN:
    """The shipped classifier, in eval mode with gradients off. CheckpointError when missing or corrupted."""
    tensors, config = load_tensors(paths.shipped(folder, RECREATE), RECREATE)
    model = DigitsCNN(**config.get("model", {}))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{Path(folder) / 'model.safetensors'} does not hold a DigitsCNN ({e}). "
                              f"To recreate it: {RECREATE}") from e
    return model.to(device).eval().requires_grad_(False)


def class_accuracy(x: Tensor, labels: Tensor, classifier: nn.Module | None = None) -> float:
    """Fraction of images x (N, 1, 16, 16) in [-1, 1] whose predicted class equals labels (N,)."""
    if labels.shape != (len(x),):
        raise ValueError(f"labels must have shape (N,) = ({len(x)},); got {tuple(labels.shape)}")
    clf = classifier if classifier is not None else load_digits_classifier()
    pred = _predict(clf, x, "forward").argmax(dim=1).cpu()
    return float((pred == labels.cpu()).double().mean())


DIGITS_FD_N = 899  # samples per digits-FD evaluation: the size of the reference half


def balanced_labels(n: int = DIGITS_FD_N) -> Tensor:
    """Class labels 0..9 repeated (n,): how the course samples a conditional digits model for the digits FD.
    Random labels move the FD of the same model between about 80 and 170 (class proportions shift the feature
    mean). Balanced labels remove that, but the noise still matters at n = 899: the digits teacher (DPM-Solver++,
    16 steps) scored 64.7 to 116.3 (mean 88.0) over noise seeds 0..7. So compare models only on the same noise
    and labels, as the notebooks and benchmarks do, never across tables."""
    return torch.arange(n) % 10


def digits_halves(seed: int = 0) -> tuple[Tensor, Tensor]:
    """The 1797 real digits (16x16) split by a fixed permutation into (held-out half (898), reference half (899))."""
    real, _ = load_digits(16, "all")
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    return real[perm[: len(real) // 2]], real[perm[len(real) // 2:]]


def digits_frechet_distance(samples: Tensor, reference: Tensor | None = None,
                            classifier: nn.Module | None = None) -> float:
    """Frechet distance between the digits classifier's 128-d features of samples (N, 1, 16, 16) in [-1, 1] and
    of reference images, d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) (see metrics.frechet_distance).

    The default reference is the fixed reference half of the real digits (`digits_halves`), and the course scores
    DIGITS_FD_N = 899 samples against it (its floor: the other real half, digits_halves()[0]). Fréchet
    distances are biased upward for small N, so only values at the same N are comparable.

    This is NOT FID. It lives in the feature space of a small classifier trained on scikit-learn's digits, so
    its values are comparable only within the course, never with published FIDs. Use it where CIFAR-10 FID is
    unavailable (offline).
    """
    clf = classifier if classifier is not None else load_digits_classifier()
    ref = reference if reference is not None else digits_halves()[1]
    return frechet_distance(_predict(clf, samples, "features"), _predict(clf, ref, "features"))


def digits_features(x: Tensor, classifier: nn.Module | None = None) -> Tensor:
    """The digits classifier's 128-d penultimate features of images (N, 1, 16, 16) in [-1, 1]: (N, 128)."""
    return _predict(classifier if classifier is not None else load_digits_classifier(), x, "features")


_REFERENCES: dict[int, tuple[nn.Module, Tensor, Tensor, Tensor]] = {}   # id(classifier) -> (it, held, train, scale)


def _reference_features(clf: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(held-out features, training features, scale) of the real digits for `clf`, computed once per classifier
    (benchmarks score many models against the same references). Features are divided by the training digits' RMS
    feature value, `scale`, so that the cubic kernel sees a.b / D of order one."""
    cached = _REFERENCES.get(id(clf))
    if cached is None or cached[0] is not clf:
        held, train = (digits_features(load_digits(16, split)[0], clf) for split in ("test", "train"))
        scale = train.pow(2).mean().sqrt()
        cached = _REFERENCES[id(clf)] = (clf, held / scale, train / scale, scale)
    return cached[1:]


def digits_scores(samples: Tensor, classifier: nn.Module | None = None, blocks: int = 5) -> dict[str, float]:
    """Sample quality of generated digits (N, 1, 16, 16) in the digits classifier's feature space, against real
    digits that no course model trained on and, beside it, against the training digits:

        kid_heldout, kid_heldout_se   unbiased KID (metrics.kid) against the 297 held-out digits (split "test")
        kid_train, kid_train_se       the same against the 1500 training digits (the teachers' training set)
        fd_heldout                    Frechet distance against the held-out digits (biased upward at this size)

    A model that memorised its training digits scores kid_train well below kid_heldout; a model that generalises
    scores them alike. Use thousands of samples (cheap at 1-4 steps) so that generation noise is small. Features
    are divided by the training digits' RMS feature value so that the cubic kernel sees values of order one (KID's
    usual scale with Inception features); values are comparable within the course only."""
    clf = classifier if classifier is not None else load_digits_classifier()
    held, train, scale = _reference_features(clf)
    f = digits_features(samples, clf) / scale
    k_h, se_h = kid(f, held, blocks)
    k_t, se_t = kid(f, train, blocks)
    return {"kid_heldout": k_h, "kid_heldout_se": se_h, "kid_train": k_t, "kid_train_se": se_t,
            "fd_heldout": frechet_distance(f, held)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.classifier",
                                     description="Train the digits classifier shipped in data/digits_classifier/.")
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--out", default=str(CLASSIFIER_DIR), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, acc = train_digits_classifier(out_dir=args.out)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"test accuracy {acc:.4f} on 297 digits; wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
