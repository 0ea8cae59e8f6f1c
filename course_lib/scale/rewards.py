"""Reward models at Stable Diffusion scale, for reward feedback learning (ReFL; Hyper-SD's human-feedback stage).

    load_sd_reward(name, root=None, device="cpu") -> SDReward    name: "image-reward" or "aesthetic"
    SDReward(images (B, 3, H, W) in [-1, 1], prompts) -> (B,)    differentiable w.r.t. the images
    reward_root(), expected_files(name), RewardModelUnavailable

Both are used ONLY where their weights are present locally; nothing is downloaded (the course runs offline), and
nothing stands in for them: when the files are missing the loader raises RewardModelUnavailable, naming what to
download and where to put it. The course's own reward model for the mini SD (course_lib.reward) is another model,
for another data set; it is never returned here, whatever the name (tests/test_reward.py checks both).

Where the files go: $COURSE_REWARD_MODELS if set, else <cache_dir>/reward_models (paths.cache_dir(): the checkout's
data/cache, git-ignored):

    image-reward   ImageReward (Xu et al. 2023; BLIP ViT-L + a 5-layer MLP, trained on 137k human preference pairs)
                   <root>/ImageReward/ImageReward.pt      huggingface.co/THUDM/ImageReward (file ImageReward.pt)
                   <root>/ImageReward/med_config.json     the same repository (file med_config.json)
                   and the `image-reward` Python package (pip install image-reward), which builds BLIP with the
                   bert-base-uncased tokenizer from the Hugging Face cache (download it once while online).
                   Score: ImageReward's normalised reward ((mlp - 0.1672) / 1.0333), about N(0, 1) over its data.
    aesthetic      the LAION aesthetic predictor v2 (improved-aesthetic-predictor; an MLP on CLIP ViT-L/14 image
                   embeddings, trained on SAC + LAION-Logos + AVA ratings)
                   <root>/laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth
                        github.com/christophschuhmann/improved-aesthetic-predictor (that file)
                   <root>/laion-aesthetic/clip-vit-large-patch14/      a transformers CLIPModel folder:
                        huggingface.co/openai/clip-vit-large-patch14 (config.json + model.safetensors)
                   Score: the predicted rating, about 1 to 10 (LAION-Aesthetics 6.5+ keeps images above 6.5).

Both score images preprocessed as their training did (CLIP's preprocessing: bicubic resize of the short side to
224, centre crop, CLIP's mean and std), written with torch operations so that the gradient reaches the images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import paths

ROOT_ENV = "COURSE_REWARD_MODELS"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072    # ImageReward.py's normalisation
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"

SOURCES = {
    "image-reward": {
        "folder": "ImageReward",
        "files": {"ImageReward.pt": "https://huggingface.co/THUDM/ImageReward (file ImageReward.pt)",
                  "med_config.json": "https://huggingface.co/THUDM/ImageReward (file med_config.json)"},
        "package": ("ImageReward", "pip install image-reward (it also needs the bert-base-uncased tokenizer in the "
                                   "Hugging Face cache)"),
    },
    "aesthetic": {
        "folder": "laion-aesthetic",
        "files": {AESTHETIC_FILE: "https://github.com/christophschuhmann/improved-aesthetic-predictor (file "
                                  f"{AESTHETIC_FILE})",
                  "clip-vit-large-patch14/config.json": "https://huggingface.co/openai/clip-vit-large-patch14 "
                                                         "(config.json and model.safetensors, into "
                                                         "clip-vit-large-patch14/)"},
        "package": None,
    },
}


class RewardModelUnavailable(RuntimeError):
    """A Stable Diffusion-scale reward model's weights (or package) are not present locally; the message names what to
    download and where to put it. Nothing is downloaded and nothing is used in its place."""


def reward_root() -> Path:
    """Where the SD-scale reward models' files are read: $COURSE_REWARD_MODELS, else <cache_dir>/reward_models."""
    env = os.environ.get(ROOT_ENV, "").strip()
    return Path(env).expanduser() if env else paths.cache_dir() / "reward_models"


def expected_files(name: str, root: str | os.PathLike | None = None) -> dict[Path, str]:
    """{local path: where to download it} of reward model `name`."""
    if name not in SOURCES:
        raise ValueError(f"unknown SD-scale reward model {name!r}; known: {', '.join(SOURCES)}. The course's mini-SD "
                         "reward model is course_lib.reward.load_reward_model(), for the mini SD only")
    folder = Path(root) if root is not None else reward_root()
    folder = folder / SOURCES[name]["folder"]
    return {folder / f: url for f, url in SOURCES[name]["files"].items()}


def check_available(name: str, root: str | os.PathLike | None = None) -> Path:
    """The model's folder when every file (and its package) is present; RewardModelUnavailable naming the missing
    ones otherwise."""
    files = expected_files(name, root)
    missing = [(p, url) for p, url in files.items() if not p.is_file()]
    package = SOURCES[name]["package"]
    no_package = None
    if package is not None:
        import importlib.util

        if importlib.util.find_spec(package[0]) is None:
            no_package = package[1]
    if missing or no_package:
        lines = [f"  {p}\n      download from {url}" for p, url in missing]
        if no_package:
            lines.append(f"  the Python package {package[0]!r}: {no_package}")
        where = f"${ROOT_ENV}" if os.environ.get(ROOT_ENV, "").strip() else f"the default root (set ${ROOT_ENV} to " \
                                                                            "use another folder)"
        raise RewardModelUnavailable(
            f"the reward model {name!r} is not available offline: missing\n" + "\n".join(lines) +
            f"\nPut the files there ({where}); the course downloads nothing and uses no stand-in in its place "
            "(its mini-SD reward model, course_lib.reward, scores coloured digits only).")
    return next(iter(files)).parent


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """CLIP's preprocessing as differentiable torch operations: images (B, 3, H, W) in [-1, 1] -> [0, 1], bicubic
    resize of the short side to `size` (antialiased when shrinking), centre crop size x size, normalise with CLIP's
    mean and std: (B, 3, size, size)."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      align_corners=False, antialias=s < 1)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor's head (the keys of its .pth file: layers.0/2/4/6/7): linear layers
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between, no activations (as released)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb)


class SDReward(nn.Module):
    """A frozen SD-scale reward: forward(images (B, 3, H, W) in [-1, 1], prompts) -> (B,), differentiable w.r.t. the
    images. `name` says which model it is; `score_range` what its numbers mean."""

    name: str = ""
    score_range: str = ""


class AestheticReward(SDReward):
    """The LAION aesthetic predictor: MLP(normalised CLIP ViT-L/14 image embedding); the prompts are not used."""

    name, score_range = "aesthetic", "predicted aesthetic rating, about 1 to 10"

    def __init__(self, clip: nn.Module, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        size = int(self.clip.config.vision_config.image_size)
        emb = self.clip.get_image_features(pixel_values=clip_preprocess(images, size).to(self.clip.dtype))
        emb = getattr(emb, "pooler_output", emb)                                # (B, 768)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb.float())[:, 0]


class ImageRewardModel(SDReward):
    """ImageReward: BLIP's ViT-L image embeddings cross-attended by BLIP's text encoder on the prompt (35 tokens), the
    [CLS] feature through the MLP, normalised (ImageReward.score, written on tensors so the gradient reaches the
    images, as ImageReward's own ReFL trainer scores them)."""

    name, score_range = "image-reward", "normalised human-preference reward, about N(0, 1) over its data"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        blip, device = self.model.blip, images.device
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(images)} images")
        tok = blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(device)
        image_embeds = blip.visual_encoder(clip_preprocess(images, 224))
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        out = blip.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=atts, return_dict=True)
        r = self.model.mlp(out.last_hidden_state[:, 0, :].float())[:, 0]
        return (r - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def load_aesthetic(root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> AestheticReward:
    from transformers import CLIPModel

    folder = check_available("aesthetic", root)
    clip = CLIPModel.from_pretrained(folder / "clip-vit-large-patch14", local_files_only=True)
    if clip.config.projection_dim != 768:
        raise RewardModelUnavailable(f"{folder / 'clip-vit-large-patch14'} holds a CLIP with "
                                     f"{clip.config.projection_dim}-d embeddings; the aesthetic predictor reads "
                                     "CLIP ViT-L/14's 768-d ones (openai/clip-vit-large-patch14)")
    mlp = AestheticMLP(768)
    state = torch.load(folder / AESTHETIC_FILE, map_location="cpu", weights_only=True)
    mlp.load_state_dict(state)
    return AestheticReward(clip, mlp).to(device).eval().requires_grad_(False)


def load_image_reward(root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ImageRewardModel:
    folder = check_available("image-reward", root)
    import ImageReward as image_reward      # the package's own loader; it finds med_config.json in download_root

    model = image_reward.load(str(folder / "ImageReward.pt"), device=device, download_root=str(folder))
    return ImageRewardModel(model).to(device).eval().requires_grad_(False)


LOADERS: dict[str, Callable[..., SDReward]] = {"image-reward": load_image_reward, "aesthetic": load_aesthetic}


def load_sd_reward(name: str, root: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> SDReward:
    """The SD-scale reward model `name` ("image-reward" or "aesthetic") from its local files; RewardModelUnavailable
    (saying what to download and where) when they are missing. There is no fallback."""
    if name not in LOADERS:
        raise ValueError(f"unknown SD-scale reward model {name!r}; known: {', '.join(LOADERS)}. The course's mini-SD "
                         "reward model is course_lib.reward.load_reward_model(), for the mini SD only")
    return LOADERS[name](root, device)


def sd_reward_fn(sd: Any, reward_model: SDReward, prompts_of: Callable[[Any], Sequence[str]]
                 ) -> Callable[[Tensor, Any], Tensor]:
    """reward_fn(x0_hat latents, cond) -> (B,) for ReFL at SD scale: decode x0_hat through sd's VAE with gradients,
    clamp to [-1, 1], score with `reward_model` and the prompts prompts_of(cond) (the stage keeps its batch's prompt
    strings; an SD Cond holds only their embeddings)."""
    def reward_fn(x0_hat: Tensor, cond: Any) -> Tensor:
        images = sd.vae.decode(x0_hat.to(sd.vae.vae.dtype)).clamp(-1, 1)
        return reward_model(images, list(prompts_of(cond)))
    return reward_fn
