"""Progressive distillation: the target inverts two teacher DDIM steps into one student step."""
import pytest
import torch

from course_lib import samplers
from course_lib.data2d import GaussianMixture, batches, exact_denoiser, sample_2d
from course_lib.distill.pd import PDConfig, check_halving, distill_pd, pd_loss, pd_target
from course_lib.models import MLP2D, Denoiser
from course_lib.predictions import Pred
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.train import TrainConfig


@pytest.mark.parametrize("process", [VPCosine(), RectifiedFlow()], ids=["vp", "rf"])
@pytest.mark.parametrize("N", [1, 2, 8])
def test_one_student_step_on_the_target_equals_two_teacher_steps(process, N):
    teacher = exact_denoiser("gmm", process)
    g = torch.Generator().manual_seed(0)
    i = torch.arange(N).repeat(4)
    t = ((i + 1) / N).double()
    x0 = sample_2d("gmm", len(t), g)[0].double()
    z = process.marginal(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x_tilde = pd_target(teacher, z, t, N, process)
    t1, t2 = t - 0.5 / N, t - 1.0 / N
    two = samplers.ddim_step(teacher(samplers.ddim_step(teacher(z, t), t, t1, process), t1), t1, t2, process)
    s = process.sigma(t)[:, None]
    eps_tilde = (z - process.alpha(t)[:, None] * x_tilde) / s
    one = samplers.ddim_step(Pred(x_tilde, eps_tilde), t, t2, process)
    # where t'' = 0 the target is the teacher's x-prediction at t', which is where two steps end when sigma(0) = 0
    torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)


def test_last_step_target_is_the_teachers_x_prediction():
    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    z = torch.randn(6, 2, dtype=torch.float64)
    t = torch.full((6,), 0.25, dtype=torch.float64)  # N = 4, i = 0: t'' = 0
    x_tilde = pd_target(teacher, z, t, 4, proc)
    z1 = samplers.ddim_step(teacher(z, t), t, t - 0.125, proc)
    torch.testing.assert_close(x_tilde, teacher(z1, t - 0.125).x0)


def test_loss_vanishes_for_a_student_that_is_already_exact():
    # point-mass data: DDIM is exact, so two teacher steps equal one, and the teacher is its own perfect student
    c = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    mix = GaussianMixture.isotropic(c, 1e-4)
    proc = VPCosine()
    teacher = mix.denoiser(proc)

    class Exact(torch.nn.Module):
        process = proc

        def forward(self, x, t, y=None):
            return teacher(x, t)

    x0 = c.expand(64, 2).clone()
    loss = pd_loss(Exact(), teacher, x0, 4, torch.Generator().manual_seed(0))
    assert loss.shape == (64,) and float(loss.max()) < 1e-6


def test_halving_errors():
    assert check_halving(64, 1) == 6 and check_halving(8, 8) == 0
    with pytest.raises(ValueError, match="reachable: \\[64, 32, 16, 8, 4, 2, 1\\]"):
        check_halving(64, 3)
    with pytest.raises(ValueError, match="more steps to fewer"):
        check_halving(4, 8)


def test_rounds_return_students_for_each_halving():
    torch.manual_seed(0)
    teacher = Denoiser(MLP2D(hidden=32, depth=2), VPCosine(), "v").eval().requires_grad_(False)
    students: dict = {}
    last, _ = distill_pd(teacher, batches("gmm"), PDConfig(8, 2),
                         run=TrainConfig(steps=3, batch_size=16), progress=False, rounds=students)
    assert last is students[2]
    assert sorted(students) == [2, 4]
    assert all(not any(p.requires_grad for p in s.parameters()) for s in students.values())
    x = torch.randn(5, 2)
    assert not torch.equal(students[4](x, torch.ones(5)).x0, teacher(x, torch.ones(5)).x0)


def test_target_geometry_puts_the_target_on_the_line_through_two_teacher_steps():
    from course_lib.distill.pd import target_geometry

    proc = VPCosine()
    teacher = exact_denoiser("gmm", proc)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 2, generator=g, dtype=torch.float64)
    for N, t0 in ((2, 1.0), (4, 0.5)):
        t = torch.full((5,), t0, dtype=torch.float64)
        p = target_geometry(teacher, z, t, N, proc)
        torch.testing.assert_close(p["x_tilde"], pd_target(teacher, z, t, N, proc))
        t2 = t - 1.0 / N
        # one DDIM step t -> t'' with x = x_tilde lands on z_t2; with the teacher's own x_hat on one_step
        coef = (proc.alpha(t2) - proc.sigma(t2) / proc.sigma(t) * proc.alpha(t))[:, None]
        torch.testing.assert_close(p["scaled_z"] + coef * p["x_tilde"], p["z_t2"])
        torch.testing.assert_close(p["scaled_z"] + coef * p["x_hat"], p["one_step"])
        assert (p["one_step"] - p["z_t2"]).norm(dim=1).min() > 1e-3    # one teacher step is not two
