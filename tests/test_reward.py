"""Reward models: the course's own for the mini SD (course_lib.reward) and the SD-scale ones (course_lib.scale.rewards).

The mini-SD reward model is not the judge (another architecture, seed and data pipeline) yet reads the held-out
digits as the judge does; its reward is in [0, 1], differentiable w.r.t. the images and, through the VAE decoder,
w.r.t. the predicted latents (sd_reward_fn, ReFL's interface); the prompt's digit and colour are read back from the
text embeddings and an embedding that is no caption (the empty prompt) is refused. ImageReward and the LAION
aesthetic predictor are used only from local files: missing files are refused with a message naming what to download
and where to put it, and the course's reward model is never returned in their place."""
from __future__ import annotations

import json

import pytest
import torch

from course_lib import classifier, minisd, reward
from course_lib.scale import rewards

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def mini():
    return minisd.load_mini_sd()


@pytest.fixture(scope="module")
def model():
    return reward.load_reward_model()


def test_the_reward_model_is_not_the_judge(model):
    judge = classifier.load_digits_classifier()
    assert type(model) is not type(judge)
    assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in judge.parameters())
    cfg = json.loads((reward.REWARD_DIR / "config.json").read_text())
    judge_cfg = json.loads((classifier.CLASSIFIER_DIR / "config.json").read_text())
    assert cfg["config"]["seed"] != judge_cfg["train_config"]["seed"]
    assert (reward.REWARD_DIR / "model.safetensors").stat().st_size < 400_000          # small enough to ship


def test_the_shipped_reward_model_reads_held_out_digits_and_colours_like_the_judge(model):
    data = reward.held_out_images(None)
    pick = torch.arange(0, len(data["y"]), 3)                                       # every colour, 495 images
    x, y, c = data["x"][pick], data["y"][pick], data["c"][pick]
    with torch.no_grad():
        d, col = model(x)
        read = classifier.load_digits_classifier()(minisd.to_grayscale(x)).argmax(1)
    pred = d[:, :10].argmax(1)
    assert float((pred == y).float().mean()) >= 0.93
    assert float((col.argmax(1) == c).float().mean()) >= 0.98
    assert float((pred == read).float().mean()) >= 0.93
    noise = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert float((model(noise)[0].argmax(1) == reward.NONE).float().mean()) >= 0.9


def test_reward_range_gradient_and_the_colour_factor(model):
    data = reward.held_out_images(None)
    x = data["x"][:16].clone().requires_grad_(True)
    y, c = data["y"][:16], data["c"][:16]
    r = reward.reward(model, x, y, c)
    assert r.shape == (16,) and bool(((r >= 0) & (r <= 1)).all()) and float(r.mean()) > 0.8
    (g,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    with torch.no_grad():
        d, col = model(x)
        p_digit = d.softmax(1)[torch.arange(16), y]
        p_col = col.softmax(1)[torch.arange(16), c]
        torch.testing.assert_close(reward.reward(model, x, y, torch.full((16,), -1)), p_digit)
        torch.testing.assert_close(reward.reward(model, x, y, c), p_digit * p_col)
        wrong = reward.reward(model, x, (y + 1) % 10, c)
    assert float(wrong.mean()) < 0.2                                                # another digit scores low
    with pytest.raises(ValueError, match="digits 0..9"):
        reward.reward(model, x, torch.full((16,), 10))
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.zeros(2, 1, 16, 16))


def test_sd_reward_fn_reads_the_prompt_and_passes_gradients_through_the_decoder(mini, model):
    fn = reward.sd_reward_fn(mini, model)
    recs = [{"label": 7, "colour": "red", "template": 3}, {"label": 2, "colour": None, "template": 0},
            {"label": 4, "colour": "blue", "template": 6}]
    prompts = [minisd.caption(r["label"], "thin", r["colour"] or "white", r["template"]) for r in recs]
    cond = mini.text(prompts)
    labels, colours = fn.reader(cond.text)
    assert labels.tolist() == [7, 2, 4] and colours.tolist() == [1, -1, 3]
    bf16 = fn.reader(cond.text.bfloat16())                            # a bf16 embedding reads the same
    assert bf16[0].tolist() == [7, 2, 4] and bf16[1].tolist() == [1, -1, 3]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    r = fn(z, cond)
    assert r.shape == (3,)
    (g,) = torch.autograd.grad(r.sum(), z)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0                     # the student gets a gradient
    with torch.no_grad():
        want = reward.reward(model, mini.vae.decode(z).clamp(-1, 1), labels, colours)
    torch.testing.assert_close(r.detach(), want)
    with pytest.raises(ValueError, match="not embeddings of the course's captions"):
        fn(z[:1], mini.text([""]))
    with pytest.raises(ValueError, match="needs the prompts' Cond"):
        fn(z, None)


def test_the_builder_trains_writes_and_loads(mini, tmp_path):
    from dataclasses import replace

    cfg = replace(reward.RewardConfig(), steps=3, batch=16, widths=(8, 8, 8, 8), groups=4)
    m, summary = reward.train_reward_model(cfg, mini, tmp_path / "r", progress=False)
    again = reward.load_reward_model(tmp_path / "r")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], m(x)[0])
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["held_out"]["n_images"] == 297 * 5 and "agreement_with_judge_vae" in saved["held_out"]
    with pytest.raises(Exception, match="does not exist.*python -m course_lib.reward train"):
        reward.load_reward_model(tmp_path / "nothing")
    # training batches: images in [-1, 1], digits and the NONE class, colour ignored (-100) on negatives only
    x, y, c = reward.training_sampler(cfg, mini.vae)(256, torch.Generator().manual_seed(0))
    assert x.shape == (256, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert bool((y == reward.NONE).any()) and bool(((c == -100) == (y == reward.NONE)).all())


# ----------------------------------------------------------------------------------------------------------------
# SD scale: only from local files, never a stand-in
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,files,url", [
    ("image-reward", ["ImageReward/ImageReward.pt", "ImageReward/med_config.json"], "huggingface.co/THUDM/ImageReward"),
    ("aesthetic", ["laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth", "laion-aesthetic/clip-vit-large-patch14"],
     "improved-aesthetic-predictor"),
])
def test_sd_scale_reward_models_missing_offline_are_refused_naming_what_to_download(name, files, url, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv(rewards.ROOT_ENV, str(tmp_path))
    assert rewards.reward_root() == tmp_path
    with pytest.raises(rewards.RewardModelUnavailable) as e:
        rewards.load_sd_reward(name)
    msg = str(e.value)
    for f in files:
        assert str(tmp_path / f) in msg
    assert url in msg and "no stand-in" in msg
    assert not any(tmp_path.iterdir())                                 # nothing written, nothing downloaded


def test_image_reward_files_without_its_package_are_refused(tmp_path):
    import importlib.util

    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("the image-reward package is installed here")
    for f in ("ImageReward.pt", "med_config.json"):
        (tmp_path / "ImageReward").mkdir(exist_ok=True)
        (tmp_path / "ImageReward" / f).write_bytes(b"")
    with pytest.raises(rewards.RewardModelUnavailable, match="pip install image-reward") as e:
        rewards.load_sd_reward("image-reward", root=tmp_path)
    assert "ImageReward.pt" not in str(e.value).split("missing")[1].split("package")[0]   # only the package is missing


def test_the_course_reward_model_is_never_used_in_their_place(tmp_path, monkeypatch):
    """Even with data/reward/ present, no name and no missing file gives back the course's mini-SD reward model."""
    assert (reward.REWARD_DIR / "model.safetensors").is_file()
    monkeypatch.setenv(rewards.ROOT_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(reward, "load_reward_model", lambda *a, **k: calls.append(a) or reward.RewardNet())
    for name in ("image-reward", "aesthetic"):
        with pytest.raises(rewards.RewardModelUnavailable):
            rewards.load_sd_reward(name)
    for name in ("course", "digits", "reward", "imagereward", ""):
        with pytest.raises(ValueError, match="unknown SD-scale reward model"):
            rewards.load_sd_reward(name)
    assert calls == []


def test_the_aesthetic_predictor_is_used_when_its_files_are_present(tmp_path, tiny_sd):
    """A stand-in for the real files with the real layout (a CLIP with 768-d projections, the MLP's .pth keys): the
    loader reads them, and the score is MLP(normalised CLIP image embedding), differentiable w.r.t. the images."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path / "laion-aesthetic"
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "vocab_size": 99, "max_position_embeddings": 16},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=768)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder / "clip-vit-large-patch14")
    mlp = rewards.AestheticMLP().eval()                      # (its dropouts off, as the loader's)
    torch.save(mlp.state_dict(), folder / rewards.AESTHETIC_FILE)
    model = rewards.load_sd_reward("aesthetic", root=tmp_path)
    assert isinstance(model, rewards.AestheticReward) and not isinstance(model, reward.RewardNet)
    images = (torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_(True)
    s = model(images, ["a", "b"])
    assert s.shape == (2,)
    (g,) = torch.autograd.grad(s.sum(), images)
    assert float(g.abs().sum()) > 0
    with torch.no_grad():
        pix = rewards.clip_preprocess(images, 32)
        assert pix.shape == (2, 3, 32, 32)
        emb = model.clip.get_image_features(pixel_values=pix)
        emb = getattr(emb, "pooler_output", emb)
        want = mlp(emb / emb.norm(dim=-1, keepdim=True))[:, 0]
    torch.testing.assert_close(s.detach(), want)
    # ReFL's reward_fn at SD scale: decode the predicted latents with gradients, score with the batch's prompts
    fn = rewards.sd_reward_fn(tiny_sd, model, lambda cond: ["a", "b"])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    r = fn(z, tiny_sd.text(["a", "b"]))
    (gz,) = torch.autograd.grad(r.sum(), z)
    assert r.shape == (2,) and float(gz.abs().sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(r, model(tiny_sd.vae.decode(z).clamp(-1, 1), ["a", "b"]))


def test_reward_ascent_on_the_predicted_latents_raises_the_reward(mini, model):
    """The gradient that ReFL gives the student points up the reward: normalised gradient steps of log r on one-step
    DDIM latents raise the mean reward of the decoded images. (On these blurry samples the reward model says "no
    digit" with probability near 1: r is near 1e-5 and its own gradient vanishes; log r's does not.)"""
    from course_lib import grids, samplers
    from course_lib.guidance import cfg as guided

    prompts = [minisd.caption(d, "regular", "green", 4) for d in range(8)]
    cond = mini.text(prompts)
    x1 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z = samplers.ddim(guided(mini.model, minisd.DEFAULT_W), x1, grids.sd_grid(1, mini.model.process, "trailing"),
                          mini.model.process, cond=cond)
    fn, log_fn = reward.sd_reward_fn(mini, model), reward.sd_reward_fn(mini, model, log=True)
    with torch.no_grad():
        before = fn(z, cond)
        torch.testing.assert_close(log_fn(z, cond).exp(), before)
    for _ in range(10):
        z = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(log_fn(z, cond).sum(), z)
        z = z + 0.5 * g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
    with torch.no_grad():
        after = fn(z, cond)
    assert bool((after > before).all())
    assert float((after.log() - before.log()).mean()) > 2.0                        # r grows e^2-fold at least
