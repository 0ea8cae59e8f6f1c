"""The shipped teachers load, and are good: quality bounds measured against the data floor."""
import pytest
import torch

from course_lib import teachers
from course_lib.conditioning import labels
from course_lib.checkpoint import CheckpointError
from course_lib.classifier import class_accuracy
from course_lib.data2d import sample_2d
from course_lib.metrics import sliced_wasserstein
from course_lib.samplers import generate

N = 4000


@pytest.mark.parametrize("name, sampler, steps", [("checkerboard-vp", "dpmpp2m", 32), ("gmm-vp", "dpmpp2m", 32),
                                                  ("checkerboard-rf", "heun", 16), ("gmm-rf", "heun", 16)])
def test_2d_teachers_reach_twice_the_data_floor(name, sampler, steps):
    teacher = teachers.load_teacher(name)
    ds = name.rsplit("-", 1)[0]
    ref = sample_2d(ds, N, torch.Generator().manual_seed(1))[0]
    floor = sliced_wasserstein(sample_2d(ds, N, torch.Generator().manual_seed(2))[0], ref)
    x = generate(teacher, teacher.process, (N, 2), sampler, steps, generator=torch.Generator().manual_seed(3))
    assert sliced_wasserstein(x, ref) < 2.0 * floor


def test_digits_teacher_draws_the_requested_digits():
    teacher = teachers.load_teacher("digits")
    y = torch.arange(10).repeat(10)
    x = generate(teacher, teacher.process, (len(y), 1, 16, 16), "dpmpp2m", 16,
                 generator=torch.Generator().manual_seed(0), cond=labels(y, 10))
    assert x.shape == (100, 1, 16, 16) and x.min() >= -1.5 and x.max() <= 1.5
    assert class_accuracy(x, y) > 0.9


def test_unknown_and_missing_teachers(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid teachers: checkerboard-vp"):
        teachers.load_teacher("cifar")
    monkeypatch.setattr(teachers, "TEACHER_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="python -m course_lib.teachers train digits"):
        teachers.load_teacher("digits")


def test_hub_teacher_offline_says_so_and_returns_none(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert teachers.load_hub_teacher("google/ddpm-cifar10-32") is None
    assert "OFFLINE" in capsys.readouterr().err
