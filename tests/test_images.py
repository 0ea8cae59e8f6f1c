"""Image data (digits offline, CIFAR-10 from its on-disk format) and the shipped digits classifier."""
import pickle
import shutil

import numpy as np
import pytest
import torch

from course_lib.checkpoint import CheckpointError
from course_lib.classifier import (CLASSIFIER_DIR, augment, class_accuracy, digits_frechet_distance,
                                   load_digits_classifier)
from course_lib.images import DatasetUnavailable, load_cifar10, load_digits

torch.set_num_threads(1)


# -- digits ------------------------------------------------------------------------------------------------------------

def test_digits_shapes_range_and_disjoint_splits():
    x_all, y_all = load_digits(16, "all")
    x_tr, y_tr = load_digits(16, "train")
    x_te, y_te = load_digits(16, "test")
    assert x_all.shape == (1797, 1, 16, 16) and y_all.shape == (1797,) and y_all.dtype == torch.long
    assert x_tr.shape == (1500, 1, 16, 16) and x_te.shape == (297, 1, 16, 16)
    assert x_all.min() >= -1 and x_all.max() <= 1 and x_all.min() == -1
    assert set(y_te.tolist()) == set(range(10))
    # the splits partition the dataset, and no test image appears among the training images
    torch.testing.assert_close(torch.cat([x_tr, x_te]), x_all)
    assert torch.cdist(x_te.flatten(1), x_tr.flatten(1)).min() > 0
    assert load_digits(8, "test")[0].shape == (297, 1, 8, 8)


# -- CIFAR-10 in its on-disk format ----------------------------------------------------------------------------------

def _write_tiny_cifar(root, n_per_batch=2, n_test=3, seed=0):
    """CIFAR-10's python format: pickled dicts with "data" uint8 (n, 3072) (R, G, B planes, row-major) and
    "labels"; batches.meta holds "label_names". The real files are Python 2 pickles whose str keys read as b"data"
    under pickle.load(encoding="bytes") (the CIFAR page's recipe) and as "data" under torchvision's
    encoding="latin1"; a Python 3 writer must use str keys to give what torchvision sees."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return written


def test_cifar10_loader_reads_the_on_disk_format(tmp_path):
    written = _write_tiny_cifar(tmp_path)
    x, y = load_cifar10(tmp_path, train=True, download=False)
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    expected = torch.from_numpy(data.reshape(10, 3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(x, expected)
    assert y.tolist() == labels
    # pixel (channel 1, row 2, col 3) of image 0 is byte 1024 + 2 * 32 + 3 of its row
    assert x[0, 1, 2, 3] == pytest.approx(data[0, 1024 + 67] / 127.5 - 1)
    x_test, y_test = load_cifar10(tmp_path, train=False, download=False)
    assert x_test.shape == (3, 3, 32, 32) and y_test.tolist() == written["test_batch"][1]
    assert x_test.min() >= -1 and x_test.max() <= 1


def test_cifar10_missing_without_download_says_what_to_do(tmp_path):
    with pytest.raises(DatasetUnavailable, match="dataset='digits'") as info:
        load_cifar10(tmp_path, download=False)
    assert "cifar-10-batches-py" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_cifar10_unreadable_file_is_reported(tmp_path):
    _write_tiny_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetUnavailable, match="unreadable"):
        load_cifar10(tmp_path, download=False)


# -- the shipped digits classifier -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_classifier_accuracy_and_features(classifier):
    x_te, y_te = load_digits(16, "test")
    assert class_accuracy(x_te, y_te, classifier) > 0.95
    x_all, y_all = load_digits(16, "all")
    assert class_accuracy(x_all, y_all, classifier) > 0.95
    assert classifier.features(x_te[:7]).shape == (7, 128)
    assert classifier(x_te[:7]).shape == (7, 10)
    assert not any(p.requires_grad for p in classifier.parameters())
    with pytest.raises(ValueError, match="16, 16"):
        classifier(torch.zeros(2, 1, 8, 8))


def test_classifier_files_are_small_and_record_accuracy():
    import json

    config = json.loads((CLASSIFIER_DIR / "config.json").read_text())
    assert config["test_accuracy"] > 0.95
    assert (CLASSIFIER_DIR / "model.safetensors").stat().st_size < 1_000_000


def test_digits_frechet_distance_separates_real_from_noise(classifier):
    x_te, _ = load_digits(16, "test")
    noise = torch.rand(297, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = digits_frechet_distance(x_te, classifier=classifier)
    fake = digits_frechet_distance(noise, classifier=classifier)
    assert 0 <= real < fake / 10


def test_missing_or_corrupted_classifier_says_how_to_recreate(tmp_path):
    with pytest.raises(CheckpointError, match="python -m course_lib.classifier train"):
        load_digits_classifier(folder=tmp_path / "nothing")
    folder = tmp_path / "broken"
    shutil.copytree(CLASSIFIER_DIR, folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="python -m course_lib.classifier train"):
        load_digits_classifier(folder=folder)


def test_augment_shifts_by_at_most_one_pixel():
    x = load_digits(16, "test")[0][:16]
    g = torch.Generator().manual_seed(0)
    out = augment(x, g, noise_std=0.0)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = torch.stack([padded[:, :, i:i + 16, j:j + 16] for i in range(3) for j in range(3)])  # (9, N, 1, 16, 16)
    assert ((shifts - out[None]).abs().flatten(2).amax(dim=2) == 0).any(dim=0).all()


def test_digits_scores_real_digits_near_the_floor_noise_far():
    from course_lib.classifier import digits_scores
    from course_lib.images import load_digits

    train, _ = load_digits(16, "train")
    real = digits_scores(train[:600])                     # real digits the teachers trained on
    assert abs(real["kid_train"]) < 3 * real["kid_train_se"] + 0.02        # unbiased: ~0 against their own set
    assert real["kid_heldout"] < 0.3                      # held-out digits (other writers) differ a little
    noise = digits_scores(torch.rand(600, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["kid_heldout"] > 1.0 and noise["kid_heldout"] > 10 * noise["kid_heldout_se"]
