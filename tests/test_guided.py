"""Guided distillation (Meng et al. 2023): the guided target, the w embedding, stage 1 and stage 2."""
from functools import partial

import pytest
import torch

from course_lib import data2d
from course_lib.conditioning import labelled, labels, unpack
from course_lib.distill import guided, pd
from course_lib.models import Denoiser, MLP2D, UNet, load_denoiser, save_denoiser, with_guidance_input
from course_lib.processes import VPCosine
from course_lib.train import TrainConfig
from conftest import mlp_denoiser

PROC = VPCosine()
MIX = data2d.get_mixture("gmm-overlap")
NULL = MIX.num_classes
SAMPLE = labelled(lambda n, g: data2d.sample_2d("gmm-overlap", n, g), NULL)   # (n, g) -> (x0, labels(y))
_teacher = partial(mlp_denoiser, PROC, 0, torch.float32, hidden=32, num_classes=NULL)


def _inputs(B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, y = data2d.sample_2d("gmm-overlap", B, g)
    t = 0.05 + 0.9 * torch.rand(B, generator=g)
    z = PROC.marginal(x0.double(), t.double(), torch.randn(B, 2, generator=g, dtype=torch.float64))
    return z, t.double(), labels(y, NULL), 4 * torch.rand(B, generator=g, dtype=torch.float64)


def test_guided_target_at_w0_is_the_conditional_teacher():
    z, t, y, _ = _inputs()
    teacher = MIX.denoiser(PROC)
    got = guided.guided_target(teacher, z, t, y, torch.zeros(len(z), dtype=z.dtype))
    assert torch.allclose(got, teacher(z, t, y).x0, atol=1e-12)


def test_guided_target_is_one_plus_w_cond_minus_w_uncond():
    z, t, y, w = _inputs()
    cond = MIX.posterior_mean(z, t, PROC, y.y).x0                              # exact p(x0 | z_t, y)
    uncond = MIX.posterior_mean(z, t, PROC).x0                               # exact p(x0 | z_t)
    want = (1 + w)[:, None] * cond - w[:, None] * uncond
    assert torch.allclose(guided.guided_target(MIX.denoiser(PROC), z, t, y, w), want, atol=1e-10)
    # a scalar w means the same weight for every sample
    want2 = 3 * cond - 2 * uncond
    assert torch.allclose(guided.guided_target(MIX.denoiser(PROC), z, t, y, 2.0), want2, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_fresh_student_is_exactly_the_conditional_teacher(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "mlp":
        teacher = _teacher()
        x, y = torch.randn(16, 2), labels(torch.randint(NULL, (16,)), NULL)
    else:
        net = UNet(sample_size=8, block_out_channels=(8, 16), num_classes=10, norm_num_groups=4)
        teacher = Denoiser(net, PROC, "v")
        x, y = torch.randn(4, 1, 8, 8), labels(torch.randint(10, (4,)), 10)
    t = torch.rand(len(x))
    student = with_guidance_input(teacher, (0.0, 4.0))
    with torch.no_grad():
        for w in (0.0, 1.5, 4.0):
            assert torch.equal(student(x, t, y.with_w(w)).x0, teacher(x, t, y).x0)
        # train the embedding a little so w matters, then check the checkpoint round trip
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
        w = torch.linspace(0, 4, len(x))
        save_denoiser(tmp_path, student)
        loaded, config = load_denoiser(tmp_path)
        assert config["denoiser"]["net"]["guidance_range"] == [0.0, 4.0]
        assert torch.equal(loaded(x, t, y.with_w(w)).x0, student(x, t, y.with_w(w)).x0)
        assert not torch.equal(student(x, t, y.with_w(w)).x0, student(x, t, y.with_w(w.flip(0))).x0)  # w: an input


def test_w_outside_the_range_and_missing_w_are_clear_errors():
    student = with_guidance_input(_teacher(), (0.0, 4.0))
    x, t, y = torch.randn(3, 2), torch.rand(3), labels(torch.zeros(3, dtype=torch.long), NULL)
    with pytest.raises(ValueError, match=r"distilled for guidance weights in \[0, 4\]; got 6"):
        student(x, t, y.with_w(6.0))
    with pytest.raises(ValueError, match=r"got -1"):
        student(x, t, y.with_w(torch.tensor([0.0, -1.0, 2.0])))
    with pytest.raises(ValueError, match="takes a guidance weight"):
        student(x, t, y)
    with pytest.raises(ValueError, match="no guidance input"):
        _teacher()(x, t, y.with_w(1.0))
    with pytest.raises(ValueError, match="class-conditional"):
        with_guidance_input(Denoiser(MLP2D(hidden=8, depth=2), PROC, "v"), (0, 4))
    with pytest.raises(ValueError, match="cannot be reached"):
        guided.distill_steps(student, SAMPLE, guided.StepsConfig(8, 3),
                             run=TrainConfig(steps=1, batch_size=4))


def test_stage1_lowers_the_loss_on_the_overlap_mixture():
    torch.manual_seed(0)
    teacher = _teacher(hidden=64)
    # the loss only needs teacher(x, t, y) -> Pred: the exact mixture makes stage 1's target exact
    student = with_guidance_input(teacher, (0.0, 4.0))
    sample = SAMPLE
    exact = MIX.denoiser(PROC)

    def loss(model, batch, g):
        x0, cond = unpack(batch)
        return guided.guided_loss(model, exact, x0, cond, (0.0, 4.0), g)

    from course_lib.train import train

    state = train(student, loss, sample, TrainConfig(steps=300, batch_size=256, lr=2e-3, ema_decay=0.0),
                  progress=False)
    first, last = sum(state.losses["model"][:20]) / 20, sum(state.losses["model"][-20:]) / 20
    assert last < 0.5 * first, (first, last)


def test_distill_guidance_runs_and_resumes(tmp_path):
    teacher = _teacher()
    sample = SAMPLE
    cfg = TrainConfig(steps=4, batch_size=32, ema_decay=0.0)
    _, state = guided.distill_guidance(teacher, sample, guided.GuidedConfig((0.0, 4.0)), run=cfg, ckpt_dir=tmp_path,
                                       progress=False)
    assert state.step == 4 and len(state.losses["model"]) == 4
    _, again = guided.distill_guidance(teacher, sample, guided.GuidedConfig((0.0, 4.0)), run=cfg, ckpt_dir=tmp_path,
                                       progress=False)
    assert again.step == 4  # resumed, nothing left to do


def test_stage2_runs_a_pd_round_with_w_inputs():
    student = with_guidance_input(_teacher(), (1.0, 3.0))
    sample = SAMPLE
    batch = guided.guided_batches(sample, (1.0, 3.0))(500, torch.Generator().manual_seed(0))
    x0, cond = unpack(batch)
    assert cond.y.shape == (500,) and cond.null_y == NULL
    assert cond.w.shape == (500,) and 1 <= cond.w.min() <= cond.w.max() <= 3
    students: dict = {}
    guided.distill_steps(student, sample, guided.StepsConfig(4, 2), run=TrainConfig(steps=3, batch_size=16,
                         ema_decay=0.0), progress=False, rounds=students)
    assert list(students) == [2]
    x = torch.randn(5, 2)
    out = students[2](x, torch.ones(5), labels(torch.zeros(5, dtype=torch.long), NULL).with_w(2.0)).x0
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no guidance input"):
        guided.distill_steps(_teacher(), sample, guided.StepsConfig(4, 2), run=TrainConfig(steps=1, batch_size=4))


def test_pd_target_of_a_w0_student_equals_the_conditional_teachers():
    # the fresh student at any w is the conditional teacher, so its PD target with w inputs is the teacher's
    teacher = _teacher()
    student = with_guidance_input(teacher, (0.0, 4.0)).eval()
    z, t, y, w = _inputs(16)
    t = torch.full_like(t, 0.5).float()
    z = z.float()
    with torch.no_grad():
        a = pd.pd_target(student, z, t, 4, PROC, y.with_w(w.float()))
        b = pd.pd_target(teacher, z, t, 4, PROC, y)
    assert torch.equal(a, b)


@pytest.mark.parametrize("w_range", [(0.0, 4.0), (1.0, 3.0)])
def test_draw_w_puts_p_w_min_of_the_mass_at_w_min(w_range):
    lo, hi = w_range
    n, p = 20_000, 0.25
    w = guided.draw_w(n, w_range, torch.Generator().manual_seed(0), p_w_min=p)
    assert w.shape == (n,) and lo <= float(w.min()) and float(w.max()) <= hi          # nothing outside the range
    at_min = float((w == lo).float().mean())
    assert abs(at_min - p) < 0.015, at_min                                             # ~p exactly at w_min
    rest = w[w != lo]
    assert abs(float(rest.mean()) - (lo + hi) / 2) < 0.03 * (hi - lo)                  # the rest still uniform
    # p_w_min = 0 (default) is the paper's plain U[w_min, w_max], the same draws as before
    plain = guided.draw_w(n, w_range, torch.Generator().manual_seed(0))
    assert float((plain == lo).float().mean()) == 0.0
    assert torch.equal(plain, guided.draw_w(n, w_range, torch.Generator().manual_seed(0), p_w_min=0.0))
    # stage 2's batches carry the same draw
    batch = guided.guided_batches(SAMPLE, w_range, p_w_min=p)(4000, torch.Generator().manual_seed(1))
    assert abs(float((batch["cond"].w == lo).float().mean()) - p) < 0.03
    with pytest.raises(ValueError, match="probability"):
        guided.draw_w(4, w_range, torch.Generator(), p_w_min=1.5)
