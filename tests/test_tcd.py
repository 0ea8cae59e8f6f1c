"""Trajectory consistency distillation (distill.tcd): the TCF against the exact Gaussian flow map and DDIM, the loss's
parts (teacher step, stop-gradient target, end point at or below t_n), the integer-timestep sampler against
diffusers' TCDScheduler on the same tiny UNet2DConditionModel (several gamma and step counts, 1e-4 relative), training
through the course's engine (2D and the tiny SD), and bad inputs (gamma, w outside the trained range, no codec)."""
from __future__ import annotations

import pytest
import torch

from course_lib import grids, minisd, samplers, sd, steps
from course_lib.data2d import exact_denoiser
from course_lib.distill import lcm, tcd
from course_lib.recipes import lcm as lcm_recipes, tcd as tcd_recipes
from course_lib.processes import RectifiedFlow, SDDiscrete, VPCosine
from course_lib.train import TrainConfig
from conftest import mlp_denoiser

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PROMPTS = ["a red circle", "two cats"]


def _close(course: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((course - ref).abs().max())
    assert err <= tol * scale, f"max |course - reference| = {err:.3g} on values up to {scale:.3g}"


@pytest.mark.parametrize("proc", [VPCosine(), RectifiedFlow(), SDDiscrete()], ids=lambda p: p.name)
def test_tcf_is_the_exponential_integrator_and_a_ddim_jump(proc):
    """Both forms of the first-order TCF agree; f(x, t, t) = x; f(x, t, 0) = x0_hat."""
    g = torch.Generator().manual_seed(0)
    model = exact_denoiser("gmm", proc)
    x = 2 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    s = t * torch.rand(64, generator=g, dtype=torch.float64)
    f = tcd.tcf(model, x, t, s, proc)
    _close(f, steps.ddim(model, x, t, s, proc), 1e-9)
    # the paper's form, with lambda = log(alpha / sigma) and h = lambda_s - lambda_t
    lam = lambda u: torch.log(proc.alpha(u) / proc.sigma(u))
    h = (lam(s) - lam(t))[:, None]
    paper = (proc.sigma(s) / proc.sigma(t))[:, None] * x + proc.alpha(s)[:, None] * (1 - torch.exp(-h)) * model(x, t).x0
    _close(f, paper, 1e-9)
    _close(tcd.tcf(model, x, t, t, proc), x, 1e-9)
    # at s = 0 it is x0_hat (up to sigma(0), which the cosine schedule keeps just above zero)
    _close(tcd.tcf(model, x, t, torch.zeros_like(t), proc), model(x, t).x0, 2e-3)


def test_tcf_of_the_exact_gaussian_teacher_lands_on_the_trajectory():
    """For Gaussian data the exact denoiser's ODE is linear; the TCF of the exact model along a trajectory, from a
    small step t -> s, stays within the first-order error of the exact ODE solution, and the error shrinks ~ h^2."""
    proc = VPCosine()
    model = exact_denoiser("gmm", proc)
    x1 = proc.prior((256, 2), torch.Generator().manual_seed(1)).double()
    fine = samplers.dpm_solver_pp_2m(model, x1, torch.linspace(1.0, 0.3, 257, dtype=torch.float64), proc,
                                     return_path=True)
    errs = []
    for j in (8, 16, 32):
        t = torch.full((256,), float(torch.linspace(1.0, 0.3, 257)[128]), dtype=torch.float64)
        s = torch.full((256,), float(torch.linspace(1.0, 0.3, 257)[128 + j]), dtype=torch.float64)
        errs.append(float((tcd.tcf(model, fine[128], t, s, proc) - fine[128 + j]).pow(2).sum(1).mean().sqrt()))
    assert errs[0] < errs[1] < errs[2] and errs[2] / errs[0] > 6            # local error of a first-order step


def test_tcd_loss_parts_and_stop_gradient():
    proc = VPCosine()
    g = torch.Generator().manual_seed(3)
    student, target, teacher = mlp_denoiser(proc, 0), mlp_denoiser(proc, 1), exact_denoiser("gmm", proc)
    x0, eps = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    grid = tcd.cm_grid(6, proc, tcd.T_MIN)
    t_cur, t_next, s = tcd.draw_times(grid, 8, g, dtype=torch.float64)
    assert bool((s <= t_cur).all()) and bool((s >= 0).all()) and bool((t_cur < t_next).all())
    loss = tcd.tcd_loss_at(student, target, teacher, x0, eps, t_next, t_cur, s, proc)
    x_next = proc.marginal(x0, t_next, eps)
    x_cur = steps.ddim(teacher, x_next, t_next, t_cur, proc)
    want = (tcd.tcf(student, x_next, t_next, s, proc) - tcd.tcf(target, x_cur, t_cur, s, proc)).pow(2).mean(1)
    _close(loss.detach(), want.detach(), 1e-10)
    # the student as its own target: the gradient only flows through the online side
    own = tcd.tcd_loss_at(student, student, teacher, x0, eps, t_next, t_cur, s, proc)
    gr = torch.autograd.grad(own.sum(), list(student.parameters()))
    online = tcd.tcf(student, x_next, t_next, s, proc)
    ref = (online - tcd.tcf(student, x_cur, t_cur, s, proc).detach()).pow(2).mean(1)
    gr_ref = torch.autograd.grad(ref.sum(), list(student.parameters()))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(gr, gr_ref))


def test_draw_end_timesteps_stay_at_or_below_tau_n():
    taus = lcm.ddim_timesteps()[torch.randint(50, (4000,), generator=torch.Generator().manual_seed(0))]
    s = tcd.draw_end_timesteps(taus, 20, torch.Generator().manual_seed(1))
    tau_n = (taus - 20).clamp_min(0)
    assert s.dtype == torch.int64 and bool((s >= 0).all()) and bool((s <= tau_n).all())
    assert int(s.max()) >= 900 and int((s == 0).sum()) > 0                     # the whole range is reached


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_timesteps_match_diffusers(n):
    from diffusers import TCDScheduler

    sch = TCDScheduler()
    sch.set_timesteps(n)
    assert tcd.tcd_timesteps(n).tolist() == sch.timesteps.tolist()


@pytest.mark.parametrize("n,gamma", [(1, 0.3), (2, 0.0), (2, 0.3), (4, 0.3), (4, 0.7), (4, 1.0), (8, 0.5)])
def test_sss_matches_diffusers_tcd_scheduler(tiny_sd_w_pipe, n, gamma):
    """The same UNet (with a w-embedding), prompts, w and noise: the course's sss and TCDScheduler's loop."""
    from diffusers import TCDScheduler

    pieces = sd.from_pipeline(tiny_sd_w_pipe)
    student = tcd.TCDModel(pieces.model, w_range=(0.0, 10.0))
    cond, w = pieces.text(PROMPTS), 3.0
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = tcd.sss(student, z1.clone(), tcd.tcd_timesteps(n), student.process,
                   torch.Generator().manual_seed(7), gamma=gamma, cond=cond.with_w(w))
    sch = TCDScheduler.from_config(tiny_sd_w_pipe.scheduler.config)
    sch.set_timesteps(n)
    g = torch.Generator().manual_seed(7)
    w_emb = sd.lcm_timestep_cond(torch.full((2,), w), lcm.W_EMBED_DIM)
    z = z1.clone()
    with torch.no_grad():
        for tau in sch.timesteps:
            out = tiny_sd_w_pipe.unet(z, tau, encoder_hidden_states=cond.text, timestep_cond=w_emb).sample
            z = sch.step(out, tau, z, eta=gamma, generator=g).prev_sample
    _close(ours, z)


def test_sss_at_gamma_one_is_lcm_multistep_of_the_same_x0(tiny_sd_w_pipe):
    """gamma = 1 jumps to timestep 0 and re-noises: LCM's multistep sampler on the x0 jumped to abar_0."""
    pieces = sd.from_pipeline(tiny_sd_w_pipe)
    student = tcd.TCDModel(pieces.model, w_range=(0.0, 10.0))
    cond = pieces.text(PROMPTS).with_w(2.0)
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    proc = student.process
    a0 = float(proc.alphas_cumprod[0])

    def at_zero(z, t, cond):                           # the TCF to timestep 0, read as a consistency function
        x0, eps = student(z, t, cond)
        return type(student(z, t, cond))(a0 ** 0.5 * x0 + (1 - a0) ** 0.5 * eps, eps)

    ts = tcd.tcd_timesteps(4)
    ours = tcd.sss(student, z1, ts, proc, torch.Generator().manual_seed(9), gamma=1.0, cond=cond)
    # lcm.multistep re-noises from x0 with alpha, sigma of the next step: renoising z_0 from timestep 0 instead
    # differs only through abar_0 = 0.99915; compare loosely
    theirs = lcm.multistep(at_zero, z1, ts, proc, torch.Generator().manual_seed(9), cond=cond)
    assert float((ours - theirs).abs().max()) < 0.05 * max(1.0, float(theirs.abs().max()))


def test_distill_tcd_2d_trains_and_beats_one_ddim_step():
    """A short 2D run on the exact mixture teacher: the one-step student's flow-map error to the exact teacher is
    below one DDIM step's."""
    from course_lib import data2d, teachers
    from course_lib.metrics import flow_map_error

    teacher = teachers.load_teacher("gmm-vp")
    proc = teacher.process
    student, done = tcd.distill_tcd(teacher, data2d.batches("gmm"),
                                    tcd.TCDConfig(N=8, lr=1e-3, ema_decay=0.9),
                                    run=TrainConfig(steps=150, batch_size=512, seed=0), progress=False)
    x1 = proc.prior((2000, 2), torch.Generator().manual_seed(4))
    exact = samplers.dpm_solver_pp_2m(exact_denoiser("gmm", proc), x1, grids.uniform(128), proc)
    one = samplers.tcd(student, x1, grids.uniform(1), proc, gamma=0.0)
    ddim1 = samplers.ddim(teacher, x1, grids.uniform(1), proc)
    assert flow_map_error(one, exact) < 0.8 * flow_map_error(ddim1, exact)


def test_distill_tcd_sd_trains_and_samples(tiny_sd, tmp_path):
    batches = minisd.digit_batches(tiny_sd, n_images=20)
    cfg = lcm.LCMConfig(steps=3, batch=4, lr=1e-3, w_dim=32)
    before = [p.clone() for p in tiny_sd.model.unet.parameters()]
    student, _ = tcd.distill_tcd_sd(tiny_sd, batches, cfg, run=lcm.train_config(cfg, "TCD"), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, tiny_sd.model.unet.parameters()))  # the teacher is untouched
    assert float(student.denoiser.unet.time_embedding.cond_proj.weight.abs().sum()) > 0
    imgs = tcd.sample(tiny_sd, student, ["a handwritten seven"], steps=2, w=3.0, gamma=0.3)
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()
    tcd_recipes.save_tcd(student, tmp_path / "tcd", {"command": "test"})
    again = tcd_recipes.load_tcd(tmp_path / "tcd", tiny_sd.model)
    cond = tiny_sd.text(PROMPTS)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((2,), 0.7)
    with torch.no_grad():
        _close(again(z, t, cond.with_w(2.0)).x0, student(z, t, cond.with_w(2.0)).x0, 1e-6)


def test_tcd_sd_target_is_a_guided_ddim_step_then_the_targets_tcf(tiny_sd):
    teacher = tiny_sd.model
    student = tcd.tcd_student(teacher, 32, (1.0, 5.0))
    cond = tiny_sd.text(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    taus, s_taus, w = torch.tensor([19, 519]), torch.tensor([0, 250]), torch.tensor([1.5, 4.0])
    got = tcd.tcd_sd_target(teacher, student, z, taus, 20, s_taus, cond, w, teacher.process)
    proc = teacher.process
    t_next, t_cur = proc.t_of_timestep(taus).float(), proc.t_of_timestep(torch.tensor([0, 499])).float()
    s = proc.t_of_timestep(s_taus).float()
    with torch.no_grad():
        cnd, unc = teacher(z, t_next, cond), teacher(z, t_next, cond.null())
        x0 = cnd.x0 + w[:, None, None, None] * (cnd.x0 - unc.x0)
        ep = cnd.eps + w[:, None, None, None] * (cnd.eps - unc.eps)
        z_cur = proc.alpha(t_cur)[:, None, None, None] * x0 + proc.sigma(t_cur)[:, None, None, None] * ep
        p = student(z_cur, t_cur, cond.with_w(w))
        want = proc.alpha(s)[:, None, None, None] * p.x0 + proc.sigma(s)[:, None, None, None] * p.eps
    _close(got, want, 1e-5)
    assert not got.requires_grad


def test_bad_inputs_raise_clear_errors(tiny_sd, tiny_sd_w_pipe):
    student = tcd.tcd_student(tiny_sd.model, 32, (2.0, 6.0))
    cond = tiny_sd.text(PROMPTS)
    z, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    for gamma in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"gamma .* must be in \[0, 1\]"):
            tcd.sss(student, z, tcd.tcd_timesteps(2), student.process, gamma=gamma, cond=cond.with_w(3.0))
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            tcd.sample(tiny_sd, student, ["a seven"], 2, 3.0, gamma=gamma)
    with pytest.raises(ValueError, match="outside the range"):
        student(z, t, cond.with_w(9.0))
    with pytest.raises(ValueError, match="outside the range"):
        tcd.sample(tiny_sd, student, ["a seven"], 2, 1.0)
    without_vae = sd.SD(tiny_sd.model, tiny_sd.text, None, tiny_sd.scheduler, None)
    with pytest.raises(ValueError, match="autoencoder"):
        tcd.distill_tcd_sd(without_vae, None, lcm.LCMConfig(steps=1, batch=2), run=TrainConfig(steps=1, batch_size=2))
    with pytest.raises(ValueError, match="autoencoder"):
        tcd.sample(without_vae, student, ["a seven"], 2, 3.0)
    with pytest.raises(FileNotFoundError, match="tcd.json"):
        tcd_recipes.load_tcd(tiny_sd_w_pipe and "/nonexistent-folder", tiny_sd.model)


def test_course_time_tcd_sampler_takes_fixed_noises():
    """samplers.tcd(noises=...) uses noises[i] at step i: the same samples as drawing them from the generator."""
    proc = VPCosine()
    model = exact_denoiser("gmm", proc)
    x1 = proc.prior((16, 2), torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(7)
    noises = torch.stack([torch.randn(16, 2, generator=g, dtype=torch.float64) for _ in range(3)])
    a = samplers.tcd(model, x1, grids.uniform(4), proc, gamma=0.4, generator=torch.Generator().manual_seed(7))
    b = samplers.tcd(model, x1, grids.uniform(4), proc, gamma=0.4, noises=noises)
    _close(a, b, 1e-12)


def test_shipped_tcd_student_loads_and_draws_the_prompted_digits():
    """The shipped student (data/tcd) on the mini SD: LCM's w range, and 4-step SSS samples that the digits
    classifier reads as the prompted digit (a quality bound far below its measured adherence, far above chance)."""
    from course_lib import classifier, minisd

    mini = minisd.load_mini_sd()
    student = tcd_recipes.load_shipped(mini)
    assert student.w_range == (lcm_recipes.RECIPE.w_min, lcm_recipes.RECIPE.w_max) and student.w_dim == lcm.W_EMBED_DIM
    prompts = [minisd.caption(d, "thick", "blue", 0) for d in range(10)] * 2
    imgs = tcd.sample(mini, student, prompts, steps=4, w=minisd.DEFAULT_W, seed=0, gamma=0.3)
    with torch.no_grad():
        read = classifier.load_digits_classifier()(minisd.to_grayscale(imgs)).argmax(1)
    assert float((read == torch.arange(10).repeat(2)).float().mean()) >= 0.7
