"""The denoising / flow-matching loss is minimised by the exact posterior mean, in every parameterization."""
import pytest
import torch

from course_lib.data2d import exact_denoiser, sample_2d
from course_lib.losses import denoising_loss, drop_labels
from course_lib.predictions import from_pred
from course_lib.processes import RectifiedFlow, VPCosine


class ExactRaw(torch.nn.Module):
    """The exact GMM denoiser speaking a network's native parameterization, optionally biased."""

    def __init__(self, process, kind, bias=0.0):
        super().__init__()
        self.process, self.parameterization, self.bias = process, kind, bias
        self.exact = exact_denoiser("gmm", process)
        self.net = torch.nn.Identity()

    def raw(self, x, t, y=None):
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
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert float((dropped == 10).float().mean()) == pytest.approx(0.1, abs=0.005)
    assert drop_labels(y, 0.0, 10, torch.Generator()) is y
    with pytest.raises(ValueError, match="null label"):
        drop_labels(y, 0.1, None, torch.Generator())
