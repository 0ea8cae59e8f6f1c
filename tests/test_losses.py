"""The denoising / flow-matching loss is minimised by the exact posterior mean, in every parameterization."""
import pytest
import torch

from course_lib.data2d import exact_denoiser, sample_2d
from course_lib.conditioning import Cond, labels
from course_lib.losses import denoising_loss
from course_lib.predictions import from_pred
from course_lib.processes import RectifiedFlow, VPCosine


class ExactRaw(torch.nn.Module):
    """The exact GMM denoiser speaking a network's native parameterization, optionally biased."""

    def __init__(self, process, kind, bias=0.0):
        super().__init__()
        self.process, self.parameterization, self.bias = process, kind, bias
        self.exact = exact_denoiser("gmm", process)
        self.net = torch.nn.Identity()

    def raw(self, x, t, cond=None):
        return from_pred(self.exact(x, t), t, self.process, self.parameterization) + self.bias


@pytest.mark.parametrize("process, kind", [(VPCosine(), "v"), (VPCosine(), "x0"), (RectifiedFlow(), "velocity"),
                                           (VPCosine(), "eps")])
def test_exact_posterior_mean_minimises_the_loss(process, kind):
    x0 = sample_2d("gmm", 20000, torch.Generator().manual_seed(0))[0].double()
    losses = {}
    for bias in (0.0, 0.1, -0.1):
        g = torch.Generator().manual_seed(1)  # the same t and noise for every candidate
        losses[bias] = float(denoising_loss(ExactRaw(process, kind, bias), x0, g, t_min=0.05).mean())
    assert losses[0.0] < losses[0.1] and losses[0.0] < losses[-0.1]
    # a constant bias b adds exactly b^2 per dimension to the expected loss at the optimum (up to MC error)
    assert losses[0.1] - losses[0.0] == pytest.approx(0.01, rel=0.3)


def test_label_dropout():
    y = torch.zeros(100_000, dtype=torch.long)
    cond = labels(y, 10)
    dropped = cond.drop(0.1, torch.Generator().manual_seed(0)).y
    assert set(dropped.unique().tolist()) == {0, 10}
    assert float((dropped == 10).float().mean()) == pytest.approx(0.1, abs=0.005)
    assert cond.drop(0.0, torch.Generator()) is cond
    with pytest.raises(ValueError, match="null_y"):
        Cond(y=y).drop(0.1, torch.Generator())


def test_the_losses_that_draw_their_own_times_are_the_one_regression_at_those_times():
    """denoising_loss (t ~ U(t_min, 1), eps, then the label dropout, in that order from one generator) and DMD's fake
    score loss are losses.denoising_loss_at at their draws, exactly; and denoising_loss_at is Eq. 14 written out."""
    from course_lib.distill.dmd import fake_score_loss
    from course_lib.losses import denoising_loss_at
    from course_lib.models import MLP2D, Denoiser

    process = VPCosine()
    model = Denoiser(MLP2D(num_classes=3), process, "v")
    x0 = sample_2d("gmm", 64, torch.Generator().manual_seed(0))[0]
    y = labels(torch.randint(3, (64,), generator=torch.Generator().manual_seed(1)), 3)
    got = denoising_loss(model, x0, torch.Generator().manual_seed(2), y, t_min=0.05, p_uncond=0.5)
    g = torch.Generator().manual_seed(2)
    t = 0.05 + 0.95 * torch.rand(64, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    y_dropped = y.drop(0.5, g)
    assert (y_dropped.y == 3).any() and (y_dropped.y != 3).any()
    assert torch.equal(got, denoising_loss_at(model, x0, t, eps, y_dropped))
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    written_out = (model.raw(a * x0 + s * eps, t, y_dropped) - (a * eps - s * x0)).pow(2).mean(1)   # v = a eps - s x0
    torch.testing.assert_close(got, written_out)
    x = x0.clone().requires_grad_(True)
    fake = fake_score_loss(model, x, t, eps, y)
    assert torch.equal(fake, denoising_loss_at(model, x0, t, eps, y))
    fake.sum().backward()
    assert x.grad is None                                    # the fake score's loss never trains the generator
