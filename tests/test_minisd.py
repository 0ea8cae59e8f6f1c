"""The course's mini Stable Diffusion (course_lib.minisd, data/mini_sd/): it loads in diffusers offline, the course's
DDIM on it reproduces diffusers' pipeline, its tokenizer has one token per caption word, its captions and prompt
list agree, the tiny config trains and resumes exactly, adherence() reads real digits, and the shipped model follows
its prompts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from course_lib import grids, guidance, minisd, samplers
from course_lib.images import load_digits
from conftest import interrupt_on_call

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
REL_TOL = 1e-4
PROMPTS = ["a handwritten seven with a thick stroke", "the digit 2, thin, in red", "a handwritten four in blue"]


def _pipe(**kwargs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(minisd.MINI_SD, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def mini():
    return minisd.load_mini_sd()


def test_shipped_folder_loads_offline_in_diffusers_and_generates():
    pipe = _pipe()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.prediction_type) == \
        ("scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    with torch.no_grad():
        out = pipe(PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert not list(minisd.MINI_SD.rglob("*.bin")) and not list(minisd.MINI_SD.rglob("*.pkl"))


def test_course_loader_gives_text_embeddings_and_latents_of_the_right_shapes(mini):
    cond = mini.text(PROMPTS)
    d = mini.text.text_model.config.hidden_size
    assert cond.text.shape == (3, 16, d) and cond.null_text.shape == (1, 16, d)
    x, _ = load_digits(16, "test")
    rgb = minisd.colourize(x[:4], minisd.COLOUR_TABLE[:4])
    with torch.no_grad():
        z = mini.vae.encode(rgb)
        rec = mini.vae.decode(z)
    assert z.shape == (4, 4, 8, 8)
    assert 0.5 < float(z.std()) < 2.0                                  # scaling_factor = 1 / std of the latents
    assert float((rec - rgb).pow(2).mean()) < 0.01                      # the VAE reconstructs held-out digits


def test_tokenizer_maps_each_caption_word_to_one_token_and_round_trips():
    tok = _pipe().tokenizer
    assert len(tok) > 100 and tok.model_max_length == 16
    for word in minisd.caption_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    built = minisd.build_tokenizer()
    for prompt in minisd.PROMPTS_TXT.read_text(encoding="utf-8").splitlines():
        ids = tok(prompt).input_ids
        assert len(ids) == len(prompt.replace(",", " ,").split()) + 2 <= tok.model_max_length   # start, words, end
        assert ids == built(prompt).input_ids
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == prompt
    assert all((minisd.MINI_SD / "tokenizer" / f).is_file() for f in ("vocab.json", "merges.txt"))


def test_learned_merges_make_every_word_one_token():
    words = ["seven", "several", "seventy", "thick", "thin", "three"]
    from transformers import CLIPTokenizer

    from course_lib.sd import _byte_vocab

    vocab, merges = _byte_vocab(), minisd.learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in words)
    assert len(tok("seventh", add_special_tokens=False).input_ids) > 1        # an unseen word falls back to pieces


@pytest.mark.parametrize("n, w", [(4, 3.0), (25, 0.0)])
def test_course_ddim_on_the_shipped_model_equals_the_diffusers_pipeline(mini, n, w):
    """The shipped scheduler is SD 1.x's schedule in a DDIMScheduler with trailing timesteps and set_alpha_to_one:
    the course's DDIM on grids.sd_grid(n, process, "trailing") with cfg(w) is the pipeline with guidance_scale 1 + w."""
    pipe = _pipe()
    cond = mini.text(PROMPTS)
    x1 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond.text, negative_prompt_embeds=cond.null().text, latents=x1.clone(),
                   guidance_scale=1 + w, num_inference_steps=n, output_type="latent").images
        ref_img = pipe.image_processor.postprocess(pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample,
                                                   output_type="pt")
    proc = mini.model.process
    ts = grids.sd_grid(n, proc, "trailing")
    z = samplers.ddim(guidance.cfg(mini.model, w), x1, ts, proc, cond=cond)
    scale = max(1.0, float(ref.abs().max()))
    assert float((z - ref).abs().max()) <= REL_TOL * scale
    with torch.no_grad():
        img = ((mini.vae.decode(z) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)


def test_adherence_reads_real_held_out_digits_in_every_colour():
    x, y = load_digits(16, "test")                                       # digits no course model trained on
    colours = minisd.COLOUR_TABLE[torch.arange(len(x)) % len(minisd.COLOURS)]
    rgb = minisd.colourize(x, colours)
    assert rgb.shape == (len(x), 3, 16, 16) and rgb.min() >= -1 and rgb.max() <= 1
    torch.testing.assert_close(minisd.to_grayscale(rgb), x, atol=1e-6, rtol=0)   # colourize's inverse
    assert minisd.adherence(rgb, y) > 0.9
    assert minisd.adherence(rgb, (y + 1) % 10) < 0.1                    # the wrong labels
    big = torch.nn.functional.interpolate(rgb, size=32, mode="bilinear", align_corners=False)
    assert minisd.adherence(big, y) > 0.85                              # other sizes are resized to 16x16
    assert torch.equal(minisd.colour_of(rgb), torch.arange(len(x)) % len(minisd.COLOURS))


def test_thickness_is_a_tertile_of_ink_mass_within_each_class():
    data = minisd.training_digits()
    counts = torch.bincount(data.thick, minlength=3).float() / len(data.thick)
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.02)
    mass = minisd.ink_mass(data.x)
    for c in range(10):
        m, t = mass[data.y == c], data.thick[data.y == c]
        assert m[t == 0].max() <= m[t == 1].min() and m[t == 1].max() <= m[t == 2].min()


def test_prompt_files_agree_with_the_caption_function():
    records = minisd.load_prompts()
    lines = minisd.PROMPTS_TXT.read_text(encoding="utf-8").splitlines()
    assert len(records) >= 200 and [r["prompt"] for r in records] == lines and len(set(lines)) == len(lines)
    assert torch.equal(torch.bincount(torch.tensor([r["label"] for r in records]), minlength=10),
                       torch.full((10,), len(records) // 10))
    for r in records:
        assert r["prompt"] == minisd.caption(r["label"], r["thickness"], r["colour"], r["template"])
        names_thick, names_colour = minisd.template_fields(r["template"])
        assert (r["thickness"] is not None) == names_thick and (r["colour"] is not None) == names_colour
    assert records == minisd.prompt_records()                            # the files are what the code writes


def test_caption_says_what_is_missing():
    assert minisd.caption(7, "thick", template=2) == "a handwritten seven with a thick stroke"
    assert minisd.caption(3, "thin", "red", 5) == "the digit 3, thin, in red"
    with pytest.raises(ValueError, match="colour"):
        minisd.caption(3, "thin", None, 5)
    with pytest.raises(ValueError, match="thickness"):
        minisd.caption(3, "medium", "red", 5)


def test_tiny_config_trains_and_resumes_exactly_after_an_interrupt(tmp_path, monkeypatch):
    cfg = minisd.MODES["tiny"]
    minisd.train_mini_sd(tmp_path / "a", cfg, ckpt_dir=tmp_path / "ckpt_a", progress=False)

    real = interrupt_on_call(monkeypatch, minisd, "ldm_loss", 3)      # during the third update (ckpt at 2)
    with pytest.raises(KeyboardInterrupt):
        minisd.train_mini_sd(tmp_path / "b", cfg, ckpt_dir=tmp_path / "ckpt_b", progress=False)
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(minisd, "ldm_loss", real)
    summary = minisd.train_mini_sd(tmp_path / "b", cfg, ckpt_dir=tmp_path / "ckpt_b", progress=False)
    for part, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")]:
        a, b = (load_file(tmp_path / r / part / f"{name}.safetensors") for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    vae_config = json.loads((tmp_path / "b" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == summary["scaling_factor"]
    sd = minisd.load_mini_sd(tmp_path / "b")                             # the tiny folder loads like the shipped one
    assert minisd.sample(sd, PROMPTS[:2], steps=2, w=1.0).shape == (2, 3, 16, 16)


def test_the_shipped_model_follows_its_prompts(mini):
    """25-step DDIM with guidance: the digits classifier reads the prompted digit in most samples (README of
    data/mini_sd/ has the full measurement over 3 x 500 samples)."""
    records = minisd.load_prompts()[::3]                                 # 100 prompts, 10 per digit
    images = minisd.sample(mini, [r["prompt"] for r in records], steps=25, w=minisd.DEFAULT_W, seed=0)
    scores = minisd.attribute_scores(images, records)
    assert scores["adherence"] >= 0.8, scores
    assert scores["colour_adherence"] >= 0.8, scores


def test_the_trained_network_describes_itself_alike_in_every_process():
    """A resumed run compares this description with the checkpoint's: it must not depend on set order (diffusers'
    private "_use_default_values" is a set, ordered by the process's hash seed)."""
    import os
    import subprocess
    import sys

    code = ("import json; from course_lib import minisd; p = minisd.build_parts(minisd.MODES['tiny']); "
            "print(json.dumps(minisd.TextToImage(p['text_encoder'], p['unet']).config(), sort_keys=True))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and '"_' not in outs[0]


def test_ldm_loss_is_eq_14_at_the_integer_timesteps():
    """minisd.ldm_loss (losses.denoising_loss_at through SD's integer timesteps) is Ho et al.'s Eq. 14 written out:
    ||eps - eps_theta(sqrt(abar_i) z0 + sqrt(1 - abar_i) eps, i, tau(ids))||^2 with the UNet called at i itself."""
    from course_lib.processes import SDDiscrete

    pipe = _pipe()
    process, unet, text_encoder = SDDiscrete(), pipe.unet, pipe.text_encoder
    net = minisd.TextToImage(text_encoder, unet)
    ids = pipe.tokenizer(PROMPTS * 2, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    z0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = minisd.ldm_loss(net, (z0, ids), torch.Generator().manual_seed(1), process)
        g = torch.Generator().manual_seed(1)
        i = torch.randint(0, 1000, (6,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        abar = process.alpha(process.t_of_timestep(i).float()).view(-1, 1, 1, 1) ** 2
        z_i = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        out = unet(z_i, i.float(), encoder_hidden_states=text_encoder(ids)[0]).sample
    torch.testing.assert_close(got, (out - eps).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)
