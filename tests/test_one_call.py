"""One model call, model(x, t, cond=None) -> Pred: the same distillation losses run unchanged on a 2D MLP with labels,
the digits UNet with labels and the tiny Stable Diffusion with text; only the model and the data change.

For each loss: per-sample values (B,), finite; gradients reach the student and never the frozen teacher; and a real
property of the loss (rectified flow: zero for the exact flow of a coupling; consistency distillation: zero for a
zero-length step with the target equal to the student; distribution matching: zero when the real and fake scores
agree), with the conditioning shown to reach the model (the null conditioning gives another loss)."""
from __future__ import annotations

import copy

import pytest
import torch

from course_lib import guidance, sd
from course_lib.conditioning import Cond, labels
from course_lib.distill import consistency, dmd, reflow
from course_lib.models import ConsistencyModel, Denoiser
from course_lib.predictions import Pred
from course_lib.processes import RectifiedFlow, VPCosine
from course_lib.train import StepContext
from conftest import mlp_denoiser, tiny_unet

B = 4
PROMPTS = ["a red circle", "two cats", "a handwritten seven", ""]


def _mlp():
    teacher = mlp_denoiser(VPCosine(), 0, torch.float32, hidden=32, num_classes=3, kind="v").eval()
    g = torch.Generator().manual_seed(1)
    return teacher, torch.randn(B, 2, generator=g), labels(torch.randint(3, (B,), generator=g), 3)


def _unet():
    teacher = Denoiser(tiny_unet(num_classes=2, norm_num_groups=8), VPCosine(), "v").eval()
    g = torch.Generator().manual_seed(2)
    return teacher, torch.randn(B, 1, 8, 8, generator=g), labels(torch.randint(2, (B,), generator=g), 2)


def _sd(pieces):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                            # the prompts' embeddings are data here
        cond = pieces.text(PROMPTS)
    return pieces.model.eval(), torch.randn(B, 4, 8, 8, generator=g), cond


@pytest.fixture(params=["mlp-labels", "unet-labels", "sd-text"])
def setup(request):
    """(teacher, x0 (B, ...), cond): the only things that change between the three."""
    if request.param == "mlp-labels":
        return _mlp()
    if request.param == "unet-labels":
        return _unet()
    return _sd(request.getfixturevalue("tiny_sd"))


def _trainable_copy(model):
    return copy.deepcopy(model).train().requires_grad_(True)


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def _reached(module) -> bool:
    return any(g is not None and float(g.abs().sum()) > 0 for g in _grads(module))


def _untouched(module) -> bool:
    return all(g is None for g in _grads(module))


def _flow_of(teacher):
    """The teacher's weights read as a rectified flow (InstaFlow's initialisation): the student of reflow."""
    return sd.as_rectified_flow(copy.deepcopy(teacher)) if isinstance(teacher, sd.SDDenoiser) else \
        reflow.as_flow(teacher)


def _shift(cond: Cond, like: torch.Tensor) -> torch.Tensor:
    """A per-sample offset (B, 1, ...) read from the conditioning: the label, or the text embedding's first feature
    averaged over the tokens."""
    v = cond.y.to(like.dtype) if cond.y is not None else cond.text[:, :, 0].mean(1).to(like.dtype)
    return v.reshape(-1, *[1] * (like.ndim - 1))


class ExactFlow:
    """The exact rectified flow of the deterministic coupling x0 = s eps + mu(cond): on the line
    x_t = (1 - t) x0 + t eps = ((1 - t) s + t) eps + (1 - t) mu the velocity eps - x0 = (1 - s) eps - mu is a
    function of (x_t, t, cond)."""

    process = RectifiedFlow()

    def __init__(self, s: float = 0.5):
        self.s = s

    def __call__(self, x, t, cond=None):
        tt = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        mu = _shift(cond, x)
        eps = (x - (1 - tt) * mu) / ((1 - tt) * self.s + tt)
        u = (1 - self.s) * eps - mu
        return Pred(x - tt * u, x + (1 - tt) * u)                 # x0 = x - t u, eps = x + (1 - t) u


def _times(seed: int, lo: float = 0.05, hi: float = 0.95):
    return lo + (hi - lo) * torch.rand(B, generator=torch.Generator().manual_seed(seed))


# --- rectified flow (reflow) ---------------------------------------------------------------------------------------

def test_rf_loss_trains_the_student_on_the_teachers_pairs(setup):
    teacher, x0, cond = setup
    teacher.requires_grad_(True)                    # frozen by use: the loss must not reach it all the same
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    eps, x_pair = reflow.generate_pairs(teacher, eps, steps=2, cond=cond)      # the teacher's coupling
    student = _trainable_copy(_flow_of(teacher))
    loss = reflow.rf_loss_at(student, x_pair, eps, _times(5), cond)
    assert loss.shape == (B,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert _reached(student) and _untouched(teacher)
    with torch.no_grad():                            # the conditioning reaches the model
        assert not torch.equal(loss.detach(), reflow.rf_loss_at(student, x_pair, eps, _times(5), cond.null()))


def test_rf_loss_is_zero_for_the_exact_flow(setup):
    _, x0, cond = setup
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    flow = ExactFlow()
    x_pair = flow.s * eps + _shift(cond, eps)                                  # the deterministic coupling
    loss = reflow.rf_loss_at(flow, x_pair, eps, _times(7), cond)
    assert loss.shape == (B,)
    torch.testing.assert_close(loss, torch.zeros(B), rtol=0, atol=1e-9)
    other = labels(cond.y + 1, cond.null_y) if cond.y is not None else Cond(text=cond.text.roll(1, 0),
                                                                            null_text=cond.null_text)
    assert (reflow.rf_loss_at(flow, x_pair, eps, _times(7), other) > 1e-6).all()   # another cond: not its flow


# --- consistency distillation --------------------------------------------------------------------------------------

def _cd_nets(teacher):
    proc = teacher.process
    t_min = consistency.default_t_min(proc)
    student = ConsistencyModel(_trainable_copy(teacher), t_min=t_min)
    target = ConsistencyModel(copy.deepcopy(teacher), t_min=t_min).eval().requires_grad_(True)
    return student, target, t_min


def test_cd_step_trains_the_student_not_the_target_or_the_teacher(setup):
    teacher, x0, cond = setup
    teacher.requires_grad_(True)
    student, target, t_min = _cd_nets(teacher)
    cfg = consistency.CMConfig(N=6, solver="heun")
    step = consistency.cd_step(cfg, consistency.cm_grid(cfg.N, teacher.process, t_min))
    ctx = StepContext("student", 0, torch.Generator().manual_seed(8),
                      {"student": student, "target": target, "teacher": teacher})
    loss = step(ctx, {"x": x0, "cond": cond})
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert _reached(student) and _untouched(target) and _untouched(teacher)
    with pytest.raises(TypeError, match="conditioning.labels"):              # a batch of bare labels is refused
        step(ctx, {"x": x0, "cond": torch.zeros(B, dtype=torch.long)})


def test_cd_loss_is_zero_for_a_zero_length_step_and_reads_the_cond(setup):
    teacher, x0, cond = setup
    student, target, _ = _cd_nets(teacher)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    t = _times(10, 0.2, 0.8)
    with torch.no_grad():
        same = consistency.cd_loss_at(student, target, teacher, x0, eps, t, t, teacher.process, "ddim", cond=cond)
        torch.testing.assert_close(same, torch.zeros(B), rtol=0, atol=1e-8)   # f(x_t, t) against itself
        s = t - 0.1
        a = consistency.cd_loss_at(student, target, teacher, x0, eps, t, s, teacher.process, "heun", cond=cond)
        b = consistency.cd_loss_at(student, target, teacher, x0, eps, t, s, teacher.process, "heun",
                                   cond=cond.null())
    assert a.shape == (B,) and torch.isfinite(a).all() and (a > 0).all() and not torch.equal(a, b)


# --- distribution matching distillation ----------------------------------------------------------------------------

def test_dm_loss_trains_the_generator_and_vanishes_when_the_scores_agree(setup):
    teacher, x0, cond = setup
    teacher.requires_grad_(True)
    proc = teacher.process
    G, fake = _trainable_copy(teacher), _trainable_copy(teacher)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    x = G(z, torch.full((B,), 0.9), cond).x0                                   # one-step generator samples
    t, eps = _times(12), torch.randn(x0.shape, generator=torch.Generator().manual_seed(13))
    real_w, fake_w = guidance.cfg(teacher, 1.5), guidance.cfg(fake, 1.5)       # a guided real score, one call each
    agree = dmd.dm_loss(x, real_w, fake_w, proc, t, eps, cond)
    assert agree.shape == (B,) and torch.equal(agree, torch.zeros(B))          # the fake score is the real one
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(14)))
    loss = dmd.dm_loss(x, real_w, fake_w, proc, t, eps, cond)
    assert loss.shape == (B,) and torch.isfinite(loss).all() and (loss > 0).all()
    loss.mean().backward()
    assert _reached(G) and _untouched(teacher) and _untouched(fake)
    # the fake score's own loss trains the fake score and never the generator
    G.zero_grad(set_to_none=True)
    x = G(z, torch.full((B,), 0.9), cond).x0
    fs = dmd.fake_score_loss(fake, x, t, eps, cond)
    assert fs.shape == (B,) and torch.isfinite(fs).all()
    fs.mean().backward()
    assert _reached(fake) and _untouched(G) and _untouched(teacher)
