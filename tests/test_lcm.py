"""Latent consistency models (distill.lcm) against diffusers on a tiny offline pipeline, and their bad inputs.

The course's multistep LCM sampler must equal diffusers' LCMScheduler on the same UNet2DConditionModel with the same
noise (1, 2, 4 and 8 steps) to 1e-4 relative; the skipping-step target must be the guided teacher's one DDIM step of
k timesteps; LCD must train the student (full and LoRA) through the course's engine; bad inputs raise clear errors.
"""
from __future__ import annotations

import pytest
import torch

from course_lib import guidance, minisd, precond, samplers, sd
from course_lib.conditioning import unpack
from course_lib.distill import lcm
from course_lib.recipes import lcm as lcm_recipes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
REL_TOL = 1e-4
PROMPTS = ["a red circle", "two cats"]


def _close(course: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((course - ref).abs().max())
    assert err <= tol * scale, f"max |course - diffusers| = {err:.3g} on values up to {scale:.3g}"


def test_grid_and_scalings_are_lcms():
    assert lcm.skipping_step() == 20
    assert lcm.ddim_timesteps()[:3].tolist() == [19, 39, 59] and int(lcm.ddim_timesteps()[-1]) == 999
    assert lcm.lcm_timesteps(4).tolist() == [999, 759, 499, 259]
    c_skip, c_out = precond.lcm(torch.tensor([0, 1, 999]))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0                       # the boundary condition
    assert abs(float(c_skip[1]) - 2.4938e-3) < 1e-6 and abs(float(c_out[1]) - 0.99875) < 1e-5  # reference card
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    for tau in (0, 1, 19, 259, 999):
        want = sch.get_scalings_for_boundary_condition_discrete(torch.tensor(tau))
        got = precond.lcm(torch.tensor([tau]))
        assert abs(float(got[0]) - float(want[0])) < 1e-7 and abs(float(got[1]) - float(want[1])) < 1e-7  # fp32


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm_timesteps_match_diffusers(n):
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    sch.set_timesteps(n)
    assert lcm.lcm_timesteps(n).tolist() == sch.timesteps.tolist()


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_multistep_sampler_matches_diffusers_lcm_scheduler(tiny_sd_w_pipe, n):
    """The same UNet (with a w-embedding), prompts, w and noise: the course's sampler and LCMScheduler's loop."""
    from diffusers import LCMScheduler

    pieces = sd.from_pipeline(tiny_sd_w_pipe)
    student = lcm.LCMModel(pieces.model, w_range=(0.0, 10.0))
    cond, w = pieces.text(PROMPTS), 3.0
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = lcm.multistep(student, z1.clone(), lcm.lcm_timesteps(n), student.process,
                         torch.Generator().manual_seed(7), cond=cond.with_w(w))
    # diffusers: the LCM pipeline's loop (embedding of guidance_scale - 1 = w, no CFG pair)
    sch = LCMScheduler.from_config(tiny_sd_w_pipe.scheduler.config)
    sch.set_timesteps(n)
    g = torch.Generator().manual_seed(7)
    w_emb = sd.lcm_timestep_cond(torch.full((2,), (1 + w) - 1.0), lcm.W_EMBED_DIM)
    z = z1.clone()
    with torch.no_grad():
        for tau in sch.timesteps:
            out = tiny_sd_w_pipe.unet(z, tau, encoder_hidden_states=cond.text, timestep_cond=w_emb).sample
            z, denoised = sch.step(out, tau, z, generator=g, return_dict=False)
    _close(ours, denoised)
    # and it is the course's consistency sampler on the LCM grid
    same = samplers.consistency(student, z1.clone(), lcm.lcm_grid(n, student.process),
                                student.process, generator=torch.Generator().manual_seed(7), cond=cond.with_w(w))
    _close(same, ours)


def test_lcm_target_is_one_guided_ddim_step_of_k_timesteps(tiny_sd):
    teacher = tiny_sd.model
    student = lcm.lcm_student(teacher, 32, (1.0, 5.0))
    cond = tiny_sd.text(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    taus, w = torch.tensor([19, 519]), torch.tensor([1.5, 4.0])
    got = lcm.lcm_target(teacher, student, z, taus, 20, cond, w, teacher.process)
    proc = teacher.process
    t_next, t_cur = proc.t_of_timestep(taus).float(), proc.t_of_timestep(torch.tensor([0, 499])).float()
    with torch.no_grad():
        cnd, unc = teacher(z, t_next, cond), teacher(z, t_next, cond.null())
        x0 = cnd.x0 + w[:, None, None, None] * (cnd.x0 - unc.x0)       # LCM's script: cond + w (cond - uncond)
        ep = cnd.eps + w[:, None, None, None] * (cnd.eps - unc.eps)
        a, s = proc.alpha(t_cur)[:, None, None, None], proc.sigma(t_cur)[:, None, None, None]
        z_cur = a * x0 + s * ep
        want = student(z_cur, t_cur, cond.with_w(w)).x0
    _close(got, want, 1e-5)
    assert not got.requires_grad
    # the zero-initialised w-projection: the student starts as the teacher (f = c_skip z + c_out x0_teacher)
    with torch.no_grad():
        f = student(z, t_next, cond.with_w(w)).x0
        c_skip, c_out = precond.lcm(taus)
        ref = c_skip.float()[:, None, None, None] * z + c_out.float()[:, None, None, None] * teacher(z, t_next, cond).x0
    _close(f, ref, 1e-5)


def test_lcd_trains_the_student_and_its_target(tiny_sd):
    torch.manual_seed(0)
    batches = minisd.digit_batches(tiny_sd, n_images=20)
    z0, cond = unpack(batches(4, torch.Generator().manual_seed(0)))
    assert z0.shape == (4, 4, 8, 8) and cond.text.shape[0] == 4 and cond.null_text.shape[0] == 1
    cfg = lcm.LCMConfig(steps=3, batch=4, lr=1e-3, w_dim=32)
    before = [p.clone() for p in tiny_sd.model.unet.parameters()]
    student, _ = lcm.distill_lcm(tiny_sd, batches, cfg, run=lcm.train_config(cfg, "LCD"), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, tiny_sd.model.unet.parameters()))  # the teacher is untouched
    moved = student.denoiser.unet.time_embedding.cond_proj.weight
    assert float(moved.abs().sum()) > 0                                                       # the w-projection learned
    imgs = lcm.sample(tiny_sd, student, ["a handwritten seven"], steps=2, w=3.0)
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()


def test_lcm_lora_trains_only_the_adapter_and_round_trips(tmp_path):
    pieces = sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))
    pieces.model.unet.requires_grad_(False)
    base = {k: v.clone() for k, v in pieces.model.unet.state_dict().items()}
    batches = minisd.digit_batches(pieces, n_images=20)
    cfg = lcm.LCMConfig(steps=2, batch=4, lr=1e-2, lora_rank=4)
    student, _ = lcm.distill_lcm_lora(pieces, batches, cfg, run=lcm.train_config(cfg, "LCM-LoRA"), w=2.0,
                                      progress=False)
    sd_after = student.denoiser.unet.state_dict()
    for k, v in base.items():                                     # the base weights never move
        key = k if k in sd_after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(sd_after[key], v), k
    lora = sd.lora_state_dict(student.denoiser)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    cond = pieces.text(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        on = student(z, t, cond).x0
        with sd.adapter_disabled(student):
            off = student(z, t, cond).x0
    assert not torch.allclose(on, off)                            # the adapter is what makes it an LCM
    lcm_recipes.save_lcm_lora(student, tmp_path / "lora")
    fresh = sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))
    again = lcm_recipes.load_lcm_lora(fresh.model, tmp_path / "lora")
    with torch.no_grad():
        _close(again(z, t, cond).x0, on, 1e-5)
    # another base model: refused, whatever the shapes
    other = sd.from_pipeline(sd.tiny_sd_pipeline(seed=1))
    with pytest.raises(ValueError, match="another base model"):
        lcm_recipes.load_lcm_lora(other.model, tmp_path / "lora")
    assert torch.equal(student(z, t, cond.with_w(2.0)).x0, on)     # its own fixed w is accepted
    with pytest.raises(ValueError, match="fixed guidance weight"):
        student(z, t, cond.with_w(3.0))


def test_lcm_lora_target_is_the_online_student_or_an_ema_of_its_adapter():
    pieces = sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))
    batches = minisd.digit_batches(pieces, n_images=20)
    cfg = lcm.LCMConfig(steps=1, batch=4, lr=1e-2, lora_rank=4)
    _, done = lcm.distill_lcm_lora(pieces, batches, cfg, run=lcm.train_config(cfg, "LCM-LoRA"), w=2.0,
                                   progress=False)
    assert not done.targets                                       # decay 0: the online student is its own target
    pieces = sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))
    ema = lcm.LCMConfig(steps=1, batch=4, lr=1e-2, lora_rank=4, lora_target_decay=0.5)
    student, done = lcm.distill_lcm_lora(pieces, batches, ema, run=lcm.train_config(ema, "LCM-LoRA"), w=2.0,
                                         progress=False)
    online = {k: p.detach() for k, p in student.denoiser.unet.named_parameters()}
    target = dict(done.targets["target"].denoiser.unet.named_parameters())
    ups = [k for k in online if "lora_B" in k]
    assert ups and any(float(online[k].abs().sum()) > 0 for k in ups)
    for k in ups:                                                 # one update from B = 0: theta^- = 0.5 theta
        torch.testing.assert_close(target[k], 0.5 * online[k])
    for k, v in online.items():                                   # the base weights are the same in both
        if "lora_" not in k:
            assert torch.equal(target[k], v), k


def test_full_student_round_trips(tiny_sd, tmp_path):
    student = lcm.lcm_student(tiny_sd.model, 32, (1.0, 5.0))
    with torch.no_grad():
        student.denoiser.unet.time_embedding.cond_proj.weight.normal_()
    lcm_recipes.save_lcm(student, tmp_path / "lcm", {"command": "test"})
    again = lcm_recipes.load_lcm(tmp_path / "lcm", tiny_sd.model)
    cond = tiny_sd.text(PROMPTS)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.full((2,), 0.7)
    with torch.no_grad():
        _close(again(z, t, cond.with_w(2.0)).x0, student(z, t, cond.with_w(2.0)).x0, 1e-6)


def test_bad_inputs_raise_clear_errors(tiny_sd):
    student = lcm.lcm_student(tiny_sd.model, 32, (2.0, 6.0))
    cond = tiny_sd.text(PROMPTS)
    z, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="outside the range"):
        student(z, t, cond.with_w(9.0))
    with pytest.raises(ValueError, match="outside the range"):
        student(z, t, cond.with_w(torch.tensor([3.0, 1.0])))
    with pytest.raises(ValueError, match="pass w"):
        student(z, t, cond)
    with pytest.raises(ValueError, match="pass cond.with_w"):
        lcm.GuidedTeacherLCM(tiny_sd.model)(z, t, cond)
    without_vae = sd.SD(tiny_sd.model, tiny_sd.text, None, tiny_sd.scheduler, None)
    with pytest.raises(ValueError, match="autoencoder"):
        lcm.distill_lcm(without_vae, None, lcm.LCMConfig(), run=lcm.train_config(lcm.LCMConfig(steps=1, batch=2), "x"))
    with pytest.raises(ValueError, match="autoencoder"):
        minisd.digit_batches(without_vae)
    with pytest.raises(ValueError, match="already has a w-embedding"):
        lcm.lcm_student(student.denoiser)
    with pytest.raises(ValueError, match="1 to 50"):
        lcm.lcm_timesteps(51)


def test_teacher_guided_step_uses_the_course_w_not_guidance_scale(tiny_sd):
    """guidance.cfg with w equals diffusers' guidance_scale = 1 + w: LCM's w is the course's w."""
    teacher, cond = tiny_sd.model, tiny_sd.text(PROMPTS)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.full((2,), 0.6)
    with torch.no_grad():
        ours = guidance.cfg(teacher, 2.0)(z, t, cond).eps
        c, u = teacher(z, t, cond).eps, teacher(z, t, cond.null()).eps
    _close(ours, u + 3.0 * (c - u), 1e-5)                         # diffusers: uncond + guidance_scale (cond - uncond)



@pytest.mark.parametrize("n", [1, 4])
def test_multistep_sampler_matches_diffusers_on_the_mini_sd(n):
    """The shipped mini SD read as an LCM-LoRA-type model (no w-embedding, fixed w): the same loop, its real UNet."""
    from diffusers import LCMScheduler

    from course_lib import minisd

    mini = minisd.load_mini_sd()
    model = lcm.LCMModel(mini.model, w_fixed=4.0)
    cond = mini.text(["a red handwritten seven", "the digit 3"])
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ours = lcm.multistep(model, z1.clone(), lcm.lcm_timesteps(n), model.process,
                         torch.Generator().manual_seed(3), cond=cond)
    sch = LCMScheduler.from_config(mini.scheduler.config)
    sch.set_timesteps(n)
    g, z = torch.Generator().manual_seed(3), z1.clone()
    with torch.no_grad():
        for tau in sch.timesteps:
            out = mini.model.unet(z, tau, encoder_hidden_states=cond.text).sample
            z, denoised = sch.step(out, tau, z, generator=g, return_dict=False)
    _close(ours, denoised)


def test_guided_teacher_read_as_an_lcm_is_consistency_sampling_of_the_guided_teacher(tiny_sd):
    base = lcm.GuidedTeacherLCM(tiny_sd.model)
    cond = tiny_sd.text(PROMPTS)
    z1 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ours = lcm.multistep(base, z1, lcm.lcm_timesteps(2), base.process,
                         torch.Generator().manual_seed(1), cond=cond.with_w(2.0))
    # the scalings make f the guided x0 up to c_skip(tau >= 19) < 1e-5
    ref = samplers.consistency(guidance.cfg(tiny_sd.model, 2.0), z1, lcm.lcm_grid(2, base.process), base.process,
                               generator=torch.Generator().manual_seed(1), cond=cond)
    _close(ours, ref, 1e-3)


def test_base_fingerprint_does_not_depend_on_the_thread_count(tiny_sd):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sd.base_fingerprint(tiny_sd.model.unet)
        torch.set_num_threads(2)
        assert sd.base_fingerprint(tiny_sd.model.unet) == one
    finally:
        torch.set_num_threads(threads)
    assert sd.base_fingerprint(sd.tiny_sd_pipeline(seed=1).unet) != one


def test_shipped_lcm_lora_loads_onto_the_mini_sd():
    from course_lib import minisd

    mini = minisd.load_mini_sd()
    model = lcm_recipes.load_shipped(mini, "lora")
    assert model.w_fixed == lcm.LORA_W and mini.model.lora is not None
    student = lcm_recipes.load_shipped(minisd.load_mini_sd(), "student")
    assert student.w_range == (lcm_recipes.RECIPE.w_min, lcm_recipes.RECIPE.w_max)


def test_merged_lora_weights_are_the_composed_adapters_and_peft_merge():
    """LCM-LoRA's theta' = theta_pre + lambda_1 tau_1 + lambda_2 tau_2 merged into plain weights (lcm.merged_copy with
    lcm.merge_lora, exercise 6.3's reference) runs like the two adapters composed by peft (lcm.compose), and
    merge_lora on one layer equals peft's own merge of that layer; the original model is not changed."""
    from peft import LoraConfig

    tiny_sd = sd.from_pipeline(sd.tiny_sd_pipeline(seed=0))         # its own copy: adapters are added in place
    model = tiny_sd.model
    sd.add_lora(model, r=4, target_modules=lcm.present_targets(model.unet), seed=0)
    model.unet.add_adapter(LoraConfig(r=2, lora_alpha=5, target_modules=["to_q", "to_v", "conv1"]),
                           adapter_name="style")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    student = lcm.LCMModel(model, w_fixed=2.0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    adapters = {"default": 1.0, "style": 0.8}
    lcm.compose(model.unet, {"default": 1.0, "style": 0.3})    # an earlier composition must not leak into the merge
    lcm.compose(model.unet, {"default": 1.0})
    merged = lcm.merged_copy(student, adapters)
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())
    cond = tiny_sd.text(PROMPTS)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        lcm.compose(model.unet, adapters)
        composed = student(z, t, cond).x0
        lcm.compose(model.unet, {})
        plain = student(z, t, cond).x0
        lcm.compose(model.unet, {"default": 1.0})
        out = merged(z, t, cond).x0
    _close(out, composed, 1e-4)
    assert (out - plain).abs().max() > 1e-2                       # the adapters matter
    # one layer against peft's own merge (get_delta_weight), both adapters at weight 1
    name, layer = next((n, m) for n, m in lcm.lora_layers(model.unet) if "style" in m.lora_A and "to_q" in n)
    W = layer.base_layer.weight
    want = W + layer.get_delta_weight("default") + layer.get_delta_weight("style")
    got = lcm.merge_lora(W, [(1.0, layer.scaling[a], layer.lora_A[a].weight, layer.lora_B[a].weight)
                             for a in ("default", "style")])
    _close(got, want, 1e-6)
