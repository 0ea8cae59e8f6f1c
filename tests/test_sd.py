"""Stable Diffusion as a course model, against diffusers on a tiny offline pipeline.

The course's DDIM with classifier-free guidance on text embeddings must reproduce diffusers' StableDiffusionPipeline
(same latents, guidance_scale = 1 + w); saved references and students must load back, the students also in diffusers
itself. Tolerance as in test_equivalence.py: max |course - diffusers| <= 1e-4 * max(1, max |diffusers|).
"""
from __future__ import annotations

import json

import pytest
import torch

from course_lib import grids, guidance, samplers, sd
from course_lib.conditioning import Cond

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
REL_TOL = 1e-4
PROMPTS = ["a red circle", "two cats"]


def _close(course: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    err = float((course - ref).abs().max())
    assert err <= REL_TOL * scale, f"max |course - diffusers| = {err:.3g} on values up to {scale:.3g}"


@pytest.fixture(scope="module")
def teacher(tiny_sd_folder):
    return sd.load_sd(tiny_sd_folder)


def _latents(seed=1, b=2):
    return torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _inputs(seed=2, b=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([0.9, 0.3])[:b].float(), torch.randn(b, 16, 32, generator=g)


def test_tiny_pipeline_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = sd.tiny_sd_pipeline(seed=0), sd.tiny_sd_pipeline(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    assert len(a.tokenizer) > 100
    assert not torch.equal(next(iter(sd.tiny_sd_pipeline(seed=1).unet.parameters())), next(iter(a.unet.parameters())))


def test_text_encoder_matches_the_pipeline_and_knows_its_null(teacher):
    from diffusers import StableDiffusionPipeline

    cond = teacher.text(PROMPTS)
    assert cond.text.shape == (2, 16, 32) and cond.null_text.shape == (1, 16, 32)
    pipe = StableDiffusionPipeline(unet=teacher.model.unet, vae=teacher.vae.vae, text_encoder=teacher.text.text_model,
                                   tokenizer=teacher.text.tokenizer, scheduler=teacher.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pos, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(cond.text, pos)
    torch.testing.assert_close(cond.null().text, neg)
    assert not torch.allclose(cond.text[0], cond.text[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n, w", [(4, 2.0), (10, 0.0)])
def test_course_ddim_with_cfg_matches_the_diffusers_pipeline(teacher, prediction_type, n, w):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # trailing spacing starts at timestep 999; set_alpha_to_one makes the last step land on the clean latents, as the
    # course grid's final t = 0 does (n divides 1000: see test_equivalence.py)
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                          prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=teacher.model.unet, vae=teacher.vae.vae, text_encoder=teacher.text.text_model,
                                   tokenizer=teacher.text.tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = teacher.text(PROMPTS)
    x1 = _latents()
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond.text, negative_prompt_embeds=cond.null().text, latents=x1.clone(),
                   guidance_scale=1 + w, num_inference_steps=n, output_type="latent").images
    model = sd.SDDenoiser(teacher.model.unet, sd.process_from_scheduler(scheduler.config),
                          sd.parameterization_from_scheduler(scheduler.config))
    proc = model.process
    course = samplers.ddim(guidance.cfg(model, w), x1, grids.sd_grid(n, proc, "trailing"), proc, cond=cond)
    assert course.shape == ref.shape == (2, 4, 8, 8)
    _close(course, ref)
    if w:  # guidance matters here, so the agreement has teeth
        unguided = samplers.ddim(guidance.cfg(model, 0.0), x1, grids.sd_grid(n, proc, "trailing"), proc, cond=cond)
        assert float((unguided - ref).abs().max()) > 100 * REL_TOL * max(1.0, float(ref.abs().max()))


def test_adapter_reads_the_scheduler_and_round_trips_through_its_reference(teacher, tiny_sd_folder, tmp_path):
    m = teacher.model
    assert m.parameterization == "eps" and m.process.config() == sd.SDDiscrete().config()
    sd.save_sd_config(tmp_path, m)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sd"]["unet"] == {"source": str(tiny_sd_folder.resolve()), "subfolder": "unet", "revision": None}
    assert not any(p.suffix == ".safetensors" for p in tmp_path.iterdir())           # a reference, no weights
    again, _ = sd.load_sd_model(tmp_path)
    x, t, text = _inputs()
    c = Cond(text=text)
    with torch.no_grad():
        a, b = m(x, t, c), again(x, t, c)
    assert torch.equal(a.eps, b.eps) and torch.equal(a.x0, b.x0)
    with pytest.raises(ValueError, match="text"):
        m(x, t, Cond(y=torch.zeros(2, dtype=torch.long)))


def test_latent_codec_scales_by_the_vae_factor(teacher):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = teacher.vae.encode(images)
        raw = teacher.vae.vae.encode(images).latent_dist.mean
        out = teacher.vae.decode(z)
        ref = teacher.vae.vae.decode(raw).sample
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, raw * teacher.vae.vae.config.scaling_factor)
    torch.testing.assert_close(out, ref)


def test_lora_student_loads_into_a_plain_diffusers_pipeline(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    student = sd.load_sd(tiny_sd_folder).model
    x, t, text = _inputs(3)
    c = Cond(text=text)
    with torch.no_grad():
        before = student.raw(x, t, c)
    sd.add_lora(student, r=4, alpha=8)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(student.raw(x, t, c), before)                   # lora_B = 0: starts as the teacher
        g = torch.Generator().manual_seed(0)
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))        # "train" the adapter a little
        after = student.raw(x, t, c)
    assert float((after - before).abs().max()) > 1e-3

    sd.save_lora(student, tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert saved == {"pytorch_lora_weights.safetensors", "config.json"}
    from safetensors.torch import load_file
    assert all("lora" in k for k in load_file(tmp_path / "pytorch_lora_weights.safetensors"))   # only the adapter

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path)
    with torch.no_grad():
        ref = pipe.unet(x, 1000 * t - 1, encoder_hidden_states=text).sample
        again, _ = sd.load_sd_model(tmp_path)                              # and the course's own loader
        mine = again.raw(x, t, c)
    torch.testing.assert_close(ref, after, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, after, rtol=1e-5, atol=1e-5)


def test_full_student_saves_as_a_diffusers_pipeline(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    student = sd.load_sd(tiny_sd_folder)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in student.model.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))            # stands in for training
    sd.save_student(student, tmp_path)
    assert list((tmp_path / "unet").glob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    x, t, text = _inputs(4)
    with torch.no_grad():
        ref = pipe.unet(x, 1000 * t - 1, encoder_hidden_states=text).sample
        mine = student.model.raw(x, t, Cond(text=text))
        again = sd.load_sd(tmp_path).model.raw(x, t, Cond(text=text))
        teacher = sd.load_sd(tiny_sd_folder).model.raw(x, t, Cond(text=text))
    assert torch.equal(ref, mine) and torch.equal(again, mine)
    assert not torch.allclose(teacher, mine, atol=1e-3)


def test_lcm_timestep_cond_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(sd.lcm_timestep_cond(w, 32), ref)


def test_importing_course_lib_does_not_import_transformers_or_peft():
    import subprocess
    import sys

    code = ("import sys, course_lib, course_lib.guidance, course_lib.losses, course_lib.conditioning, course_lib.sd; "
            "print(sorted(m for m in ('transformers', 'peft', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "transformers" not in out and "peft" not in out


def test_text_dropout_loss_trains_only_the_lora(tiny_sd_folder):
    """The course's denoising loss runs unchanged on Stable Diffusion: prompts dropped to "" with probability p_uncond
    (one draw per sample, Cond.drop), gradients reach only the LoRA adapter."""
    from course_lib.losses import denoising_loss

    student = sd.add_lora(sd.load_sd(tiny_sd_folder).model.train(), r=2)
    x0, _, text = _inputs(5)
    null = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(6))
    loss = denoising_loss(student, x0, torch.Generator().manual_seed(0), Cond(text=text, null_text=null), p_uncond=0.5)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)
