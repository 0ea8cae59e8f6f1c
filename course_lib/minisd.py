"""A mini Stable Diffusion of the course's own: Stable Diffusion's parts, trained on the digits with captions.

    MINI_SD                        the shipped diffusers pipeline folder (data/mini_sd/)
    load_mini_sd()                 it as course pieces (sd.SD: SDDenoiser, TextEncoder, LatentCodec)
    caption(label, thickness, colour, template)   the course's captions ("a handwritten seven with a thick stroke")
    adherence(images, labels)      fraction of images (B, 3, H, W) in [-1, 1] the digits classifier reads as labels
    sample(sd, prompts, steps, w)  images from the course's DDIM with guidance w (diffusers' guidance_scale = 1 + w)
    evaluate(sd, n, steps, w)      adherence and held-out KID/FD of DDIM samples of prompts from data/prompts/

The shipped scheduler is SD 1.x's schedule in a DDIMScheduler with "trailing" timesteps and set_alpha_to_one, so
StableDiffusionPipeline.from_pretrained(MINI_SD) samples exactly as the course's DDIM on grids.sd_grid(n, process,
"trailing") does. Measured quality (25-step DDIM at DEFAULT_W = 4: the classifier reads the prompted digit in 99%
of samples) is in data/mini_sd/README.md.

It is made of exactly Stable Diffusion's parts (Rombach et al. 2022): an AutoencoderKL (16x16x3 images <-> 8x8x4
latents, scaled by scaling_factor = 1 / std of the latents as SD did), a CLIPTextModel with a CLIPTokenizer whose
vocabulary is CLIP's 512 byte-level tokens plus one whole-word token per caption word (BPE merges learned on the
captions), and a UNet2DConditionModel that cross-attends to the text, trained with SD's DDPM loss (epsilon
prediction, scaled-linear betas from 0.00085 to 0.012, 1000 timesteps), 10% of captions dropped to "" so that
classifier-free guidance works. Only the 1500 training digits (images.load_digits(16, "train")) are seen; the 297
held-out digits stay unseen for evaluation.

The images are the digits drawn in one of five ink colours on black; a caption names the digit and, depending on
its template, the stroke thickness (thin / regular / thick: tertiles of the ink mass within the digit's class) and
the colour. Rebuild the shipped folder with

    python -m course_lib.minisd train --out data/mini_sd --mode laptop

transformers and diffusers are imported inside functions: importing course_lib never imports them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import grids, guidance, paths, samplers
from .classifier import class_accuracy, digits_scores, load_digits_classifier
from .conditioning import Cond
from .config import seeded
from .losses import denoising_loss_at
from .images import load_digits
from .processes import SDDiscrete
from .sd import _byte_vocab, load_sd, require_codec
from .train import TrainConfig, train

MINI_SD = paths.data_dir() / "mini_sd"                 # see course_lib.paths
PROMPTS_DIR = paths.data_dir() / "prompts"
PROMPTS_TXT, PROMPTS_JSONL = PROMPTS_DIR / "digits.txt", PROMPTS_DIR / "digits.jsonl"
RECREATE = "python -m course_lib.minisd train --out data/mini_sd --mode laptop"
DEFAULT_W = 4.0                      # the guidance weight the shipped model is measured at (guidance_scale = 1 + w)

# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "regular", "thick")
COLOURS = {                                   # ink colour (r, g, b) in [0, 1]; every one has a channel at 1
    "white": (1.0, 1.0, 1.0),
    "red": (1.0, 0.25, 0.2),
    "green": (0.25, 1.0, 0.25),
    "blue": (0.3, 0.5, 1.0),
    "yellow": (1.0, 0.9, 0.15),
}
# {word}: the digit as a word, {n}: as a numeral, {thick}: thin/regular/thick, {colour}: a name of COLOURS
TEMPLATES = (
    "a handwritten {word}",
    "the digit {n}",
    "a handwritten {word} with a {thick} stroke",
    "a handwritten {word} in {colour}",
    "a {colour} handwritten {word} with a {thick} stroke",
    "the digit {n}, {thick}, in {colour}",
    "the number {word} written in {colour} ink",
    "a {thick} {colour} {word}",
)


def template_fields(template: int) -> tuple[bool, bool]:
    """(names the thickness, names the colour) for TEMPLATES[template]."""
    t = TEMPLATES[template]
    return "{thick}" in t, "{colour}" in t


def caption(label: int, thickness: str | None = None, colour: str | None = None, template: int = 0) -> str:
    """The course's caption of a digit: caption(7, "thick", "red", 4) = "a red handwritten seven with a thick stroke".
    A template that names the thickness or the colour needs it; one that does not ignores it."""
    if not 0 <= label <= 9:
        raise ValueError(f"label is a digit 0..9; got {label}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template is 0..{len(TEMPLATES) - 1}; got {template}")
    need_thick, need_colour = template_fields(template)
    if need_thick and thickness not in THICKNESS:
        raise ValueError(f"template {template} names the stroke thickness: pass one of {THICKNESS}; got {thickness!r}")
    if need_colour and colour not in COLOURS:
        raise ValueError(f"template {template} names the colour: pass one of {tuple(COLOURS)}; got {colour!r}")
    return TEMPLATES[template].format(word=DIGIT_WORDS[label], n=label, thick=thickness, colour=colour)


def caption_words() -> list[str]:
    """Every word of every caption (lower case, as CLIP's tokenizer splits them: letters, numerals, commas)."""
    words = {w for t in TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
    words |= set(DIGIT_WORDS) | set(THICKNESS) | set(COLOURS)
    return sorted(words)


def ink_mass(x: Tensor) -> Tensor:
    """Total ink of grayscale digits x (N, 1, H, W) in [-1, 1]: sum of (x + 1) / 2, (N,)."""
    return ((x + 1) / 2).flatten(1).sum(1)


def thickness_edges(x: Tensor, y: Tensor) -> Tensor:
    """Per-class tertiles of the ink mass, (10, 2): a digit is thin below the first, thick above the second.
    Computed on the training digits (a one is thin or thick compared with other ones, not with eights)."""
    mass = ink_mass(x)
    q = torch.tensor([1 / 3, 2 / 3], dtype=mass.dtype)
    return torch.stack([torch.quantile(mass[y == c], q) for c in range(10)])


def thickness_of(x: Tensor, y: Tensor, edges: Tensor) -> Tensor:
    """Thickness index (0 thin, 1 regular, 2 thick) of grayscale digits x (N, 1, H, W) of classes y (N,)."""
    mass, e = ink_mass(x), edges[y]
    return (mass > e[:, 0]).long() + (mass > e[:, 1]).long()


def colourize(x: Tensor, colour: Tensor) -> Tensor:
    """Grayscale digits x (N, 1, H, W) in [-1, 1] drawn in ink colours colour (N, 3) in [0, 1] on black:
    (N, 3, H, W) in [-1, 1]."""
    ink = (x + 1) / 2
    return ink * colour[:, :, None, None].to(x) * 2 - 1


def to_grayscale(images: Tensor) -> Tensor:
    """The inverse of colourize for the classifier: (B, 3, H, W) in [-1, 1] -> ink = max over channels (every
    ink colour has one channel at 1), resized to 16x16: (B, 1, 16, 16) in [-1, 1] as images.load_digits gives."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 3, H, W) (or (B, 1, H, W)) in [-1, 1]; got {tuple(images.shape)}")
    g = images.float().clamp(-1, 1).amax(dim=1, keepdim=True)
    if g.shape[-2:] != (16, 16):
        g = F.interpolate(g, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    return g


def colour_of(images: Tensor) -> Tensor:
    """Nearest ink colour (index into COLOURS) of images (B, 3, H, W) in [-1, 1]: the ink-weighted mean colour,
    normalised by its largest channel, compared with each colour of COLOURS. (B,) long."""
    rgb = (images.float().clamp(-1, 1) + 1) / 2                              # (B, 3, H, W)
    ink = rgb.amax(dim=1, keepdim=True)                                      # (B, 1, H, W)
    mean = (rgb * ink).flatten(2).sum(2) / ink.flatten(2).sum(2).clamp_min(1e-6)    # (B, 3)
    mean = mean / mean.amax(dim=1, keepdim=True).clamp_min(1e-6)
    table = torch.tensor(list(COLOURS.values()))                            # (C, 3)
    return torch.cdist(mean, table).argmin(dim=1)


def adherence(images: Tensor, labels: Tensor | Sequence[int], classifier: nn.Module | None = None) -> float:
    """Prompt adherence: the fraction of images (B, 3, H, W) in [-1, 1] that the course's digits classifier
    (classifier.load_digits_classifier) reads as the prompted digit labels (B,)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return class_accuracy(to_grayscale(images), labels, classifier)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: CLIP's byte-level alphabet + whole-word tokens learned by BPE on the captions
# ----------------------------------------------------------------------------------------------------------------

def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) learned on `words` until every word is one token: repeatedly merge
    the most frequent adjacent pair (ties: the first in sorted order). Applying the merges in this order, as CLIP's
    BPE does, turns each of these words into exactly one token ("seven</w>")."""
    segs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in segs.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the course's tokenizer: CLIP's 514 start/end/byte tokens, then one token per merge
    learned on caption_words()."""
    vocab = _byte_vocab()
    merges = learn_merges(caption_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def save_vocab_files(folder: str | os.PathLike) -> None:
    """Write vocab.json and merges.txt (CLIP's own file formats) beside tokenizer.json, for tokenizer libraries
    that read those."""
    vocab, merges = tokenizer_files()
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def build_tokenizer(max_length: int = 16) -> Any:
    """A CLIPTokenizer of the course's caption vocabulary: CLIP's 514 start/end/byte tokens, then one token per
    merge learned on caption_words() (so each caption word is one token), padded with <|endoftext|> as SD 1.x."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=max_length,
                         pad_token="<|endoftext|>")


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class MiniSDConfig:
    vae_channels: tuple[int, ...] = (16, 32)     # AutoencoderKL block_out_channels: 16x16x3 -> 8x8x4
    vae_groups: int = 8                          # GroupNorm groups in the VAE
    kl_weight: float = 1e-5                      # KL weight against the per-pixel squared error (both means)
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 2e-3
    unet_channels: tuple[int, ...] = (32, 64)    # UNet2DConditionModel block_out_channels (8x8 -> 4x4)
    unet_layers: int = 1                         # layers_per_block
    unet_heads: int = 4                          # attention heads (diffusers' attention_head_dim)
    unet_groups: int = 32
    text_dim: int = 64                           # CLIPTextModel hidden size = the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16                         # tokens per prompt (start, words, end, padding)
    steps: int = 3000                            # UNet + text encoder updates (constant lr: a run can be extended)
    batch: int = 128
    lr: float = 7e-4
    warmup: int = 200
    ema_decay: float = 0.998
    p_uncond: float = 0.1                        # caption dropout to "" (classifier-free guidance)
    ckpt_every: int = 250
    seed: int = 0


MODES = {
    "tiny": MiniSDConfig(vae_channels=(8, 16), vae_groups=4, vae_steps=3, vae_batch=8, unet_channels=(16, 32),
                         unet_heads=2, unet_groups=8, text_dim=16, text_layers=1, text_heads=2, steps=3, batch=8,
                         warmup=0, ema_decay=0.9, ckpt_every=2),
    "smoke": MiniSDConfig(vae_steps=100, steps=150, batch=64, warmup=20, ema_decay=0.99, ckpt_every=50),
    "laptop": MiniSDConfig(),
}


def build_parts(cfg: MiniSDConfig) -> dict[str, Any]:
    """Random-weight VAE, text model, UNet (initialised under config.seeded(cfg.seed)), tokenizer and SD 1.x's
    schedule in a DDIMScheduler ("trailing" timesteps with set_alpha_to_one, which the course's DDIM on
    grids.sd_grid(n, process, "trailing") reproduces exactly)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(cfg.max_length)
    n = len(cfg.vae_channels)
    with seeded(cfg.seed):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(cfg.vae_channels),
                            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                            norm_num_groups=cfg.vae_groups, sample_size=16)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=4 * cfg.text_dim,
            num_attention_heads=cfg.text_heads, num_hidden_layers=cfg.text_layers,
            max_position_embeddings=cfg.max_length,
            projection_dim=cfg.text_dim, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu"))
        m = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=16 // 2 ** (n - 1), in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.unet_layers, down_block_types=("CrossAttnDownBlock2D",) * m,
            up_block_types=("CrossAttnUpBlock2D",) * m, cross_attention_dim=cfg.text_dim,
            attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_groups)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing")
    return {"vae": vae, "text_encoder": text, "unet": unet, "tokenizer": tokenizer, "scheduler": scheduler}


# ----------------------------------------------------------------------------------------------------------------
# Data: training digits, thickness, colours, captions
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Digits:
    x: Tensor            # (N, 1, 16, 16) grayscale training digits in [-1, 1]
    y: Tensor            # (N,) labels
    thick: Tensor        # (N,) thickness index into THICKNESS
    edges: Tensor        # (10, 2) per-class ink-mass tertiles


def training_digits() -> Digits:
    x, y = load_digits(16, "train")
    edges = thickness_edges(x, y)
    return Digits(x, y, thickness_of(x, y, edges), edges)


def all_captions() -> list[str]:
    """Every caption, in the order (label, thickness, colour, template): 10 x 3 x C x K strings."""
    return [caption(d, th, c, k) for d in range(10) for th in THICKNESS for c in COLOURS for k in range(len(TEMPLATES))]


def caption_table(tokenizer: Any) -> Tensor:
    """Token ids of every caption, (10, 3, C, K, L): label, thickness, colour, template."""
    L = tokenizer.model_max_length
    ids = tokenizer(all_captions(), padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    return ids.view(10, len(THICKNESS), len(COLOURS), len(TEMPLATES), L)


COLOUR_TABLE = torch.tensor(list(COLOURS.values()))                     # (C, 3)


# ----------------------------------------------------------------------------------------------------------------
# Training: first the VAE, then the text encoder and the UNet jointly
# ----------------------------------------------------------------------------------------------------------------

def vae_loss(vae: nn.Module, images: Tensor, generator: torch.Generator, kl_weight: float) -> Tensor:
    """Per-sample VAE loss: squared reconstruction error of a posterior sample, plus kl_weight times the KL to
    N(0, I) (both means over elements; SD's autoencoder also adds LPIPS and a GAN loss, unneeded at 16x16)."""
    dist = vae.encode(images).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=generator.device).to(dist.mean)
    rec = vae.decode(z).sample
    kl = 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar)
    return (rec - images).pow(2).flatten(1).mean(1) + kl_weight * kl.flatten(1).mean(1)


class TextToImage(nn.Module):
    """The text encoder and the UNet as one trained network (one optimizer, one EMA) for the course's engine."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def config(self) -> dict:
        """Both configs without private keys (diffusers' "_use_default_values" is a set: its order changes from one
        process to the next, and a resumed run compares this description with the checkpoint's)."""
        public = lambda c: {k: v for k, v in sorted(dict(c).items()) if not k.startswith("_")}
        return {"text_encoder": public(self.text_encoder.config.to_dict()), "unet": public(self.unet.config)}


class _IntegerTimesteps:
    """A diffusers UNet as the model of losses.denoising_loss_at: raw(z_t, t, cond) = eps_theta(z_t, i, cond.text) at
    SD's integer timestep i = 1000 t - 1, rounded (in float32 the product misses the integer at 10 of the 1000
    timesteps, and the mini SD was trained on exact integers)."""

    parameterization = "eps"

    def __init__(self, unet: nn.Module, process: Any):
        self.unet, self.process = unet, process

    def raw(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.unet(x, torch.round(self.process.timestep(t)), encoder_hidden_states=cond.text).sample


def ldm_loss(net: TextToImage, batch: tuple[Tensor, Tensor], generator: torch.Generator, process: Any) -> Tensor:
    """Stable Diffusion's loss (Ho et al. 2020, Eq. 14 on latents): ||eps - eps_theta(z_i, i, tau(caption))||^2
    per sample, with i ~ U{0..999}, z_i = sqrt(abar_i) z_0 + sqrt(1 - abar_i) eps; course time t = (i + 1) / 1000
    (losses.denoising_loss_at; the text encoder tau is trained with the UNet)."""
    z0, ids = batch                                                        # (B, 4, 8, 8), (B, L)
    B = z0.shape[0]
    i = torch.randint(0, process.T, (B,), generator=generator, device=generator.device).to(z0.device)
    t = process.t_of_timestep(i).to(z0.dtype)
    eps = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)
    text = net.text_encoder(ids)[0]                                        # (B, L, D)
    return denoising_loss_at(_IntegerTimesteps(net.unet, process), z0, t, eps, Cond(text=text))


@torch.no_grad()
def encode_all(vae: nn.Module, data: Digits, batch: int = 500) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every training digit in every colour: (N, C, 4, h, w) twice (unscaled)."""
    means, stds = [], []
    for c in range(len(COLOURS)):
        rgb = colourize(data.x, COLOUR_TABLE[c].expand(len(data.x), 3))
        dists = [vae.encode(rgb[k:k + batch]).latent_dist for k in range(0, len(rgb), batch)]
        means.append(torch.cat([d.mean for d in dists]))
        stds.append(torch.cat([d.std for d in dists]))
    return torch.stack(means, 1), torch.stack(stds, 1)


@torch.no_grad()
def digit_batches(sd: Any, n_images: int | None = None, batch: int = 250) -> Callable[[int, torch.Generator], dict]:
    """sample_batch(n, generator) -> {"x": z0 (n, 4, h, w) posterior samples of the teacher's VAE latents, "cond": Cond
    of the captions} over the mini SD's training digits in every ink colour and caption template (training_digits; the
    first n_images digits when given). Latents and caption embeddings are computed once."""
    require_codec(sd)
    data = training_digits()
    if n_images is not None:
        data = Digits(data.x[:n_images], data.y[:n_images], data.thick[:n_images], data.edges)
    vae = sd.vae.vae
    mean, std = encode_all(vae, data, batch)                     # (N, C, 4, h, w) unscaled
    scale, shift = sd.vae.scale, sd.vae.shift
    texts = all_captions()
    emb = torch.cat([sd.text.embed(texts[i:i + 500]) for i in range(0, len(texts), 500)])
    n_t, n_c, n_k = len(THICKNESS), len(COLOURS), len(TEMPLATES)
    emb = emb.view(10, n_t, n_c, n_k, *emb.shape[1:])
    null = sd.text.embed([""])
    N = len(data.x)

    def sample_batch(n: int, g: torch.Generator) -> dict:
        idx = torch.randint(0, N, (n,), generator=g, device=g.device).cpu()
        col = torch.randint(0, n_c, (n,), generator=g, device=g.device).cpu()
        tpl = torch.randint(0, n_k, (n,), generator=g, device=g.device).cpu()
        e = torch.randn((n, *mean.shape[2:]), generator=g, device=g.device).cpu()
        z0 = (mean[idx, col] + std[idx, col] * e - shift) * scale
        return {"x": z0, "cond": Cond(text=emb[data.y[idx], data.thick[idx], col, tpl], null_text=null)}

    return sample_batch


def train_mini_sd(out: str | os.PathLike, cfg: MiniSDConfig, ckpt_dir: str | os.PathLike | None = None,
                  progress: bool = True, allow_config_change: bool = False) -> dict:
    """Train the VAE, then the text encoder and UNet, and save a StableDiffusionPipeline folder in `out`.
    Both stages checkpoint in ckpt_dir (default: cache_dir()/mini_sd_<seed>) and resume after a kill.
    Returns a summary (parameter counts, losses, times)."""
    from diffusers import StableDiffusionPipeline

    ckpt = Path(ckpt_dir) if ckpt_dir is not None else paths.cache_dir() / f"mini_sd_{cfg.seed}"
    parts = build_parts(cfg)
    data = training_digits()
    N, C = len(data.x), len(COLOURS)
    summary: dict[str, Any] = {"config": asdict(cfg)}

    # 1. the VAE on the training digits in random ink colours
    def sample_images(n: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, N, (n,), generator=g, device=g.device)
        col = torch.randint(0, C, (n,), generator=g, device=g.device)
        return colourize(data.x[idx], COLOUR_TABLE[col])

    t0 = time.time()
    vcfg = TrainConfig(steps=cfg.vae_steps, batch_size=cfg.vae_batch, lr=cfg.vae_lr, ema_decay=0.0,
                       lr_schedule="cosine", warmup=min(100, cfg.vae_steps // 10), ckpt_every=cfg.ckpt_every,
                       seed=cfg.seed, desc="mini SD: VAE")
    vstate = train(parts["vae"], lambda m, b, g: vae_loss(m, b, g, cfg.kl_weight), sample_images, vcfg,
                   ckpt_dir=ckpt / "vae", progress=progress, extra_config={"kl_weight": cfg.kl_weight},
                   allow_config_change=allow_config_change)
    vae = vstate.model.eval().requires_grad_(False)
    summary["vae_seconds"], summary["vae_loss"] = time.time() - t0, _tail_mean(vstate.losses["model"])

    # 2. latents of every (digit, colour), the scaling factor from their std (SD: 1 / std of the latents)
    mean, std = encode_all(vae, data)                                      # (N, C, 4, h, w)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    scale = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        rec = vae.decode(mean[:, 0][:256]).sample
    summary["vae_rec_mse_white"] = float((rec - colourize(data.x[:256], COLOUR_TABLE[0].expand(256, 3))).pow(2).mean())
    summary["scaling_factor"] = scale

    # 3. text encoder + UNet with SD's loss; captions drawn per sample (template, colour), 10% dropped to ""
    tok = parts["tokenizer"]
    table = caption_table(tok)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    process = SDDiscrete()

    def sample_batch(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, N, (n,), generator=g, device=g.device)
        col = torch.randint(0, C, (n,), generator=g, device=g.device)
        tpl = torch.randint(0, len(TEMPLATES), (n,), generator=g, device=g.device)
        eps = torch.randn((n, *mean.shape[2:]), generator=g, device=g.device)
        z0 = (mean[idx, col] + std[idx, col] * eps) * scale               # a posterior sample, scaled
        ids = table[data.y[idx], data.thick[idx], col, tpl]               # (n, L)
        drop = torch.rand(n, generator=g, device=g.device) < cfg.p_uncond
        ids = torch.where(drop[:, None], empty[None], ids)
        return z0, ids

    net = TextToImage(parts["text_encoder"], parts["unet"])
    t0 = time.time()
    ucfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, ema_decay=cfg.ema_decay, warmup=cfg.warmup,
                       lr_schedule="constant", weight_decay=0.0, ckpt_every=cfg.ckpt_every, seed=cfg.seed,
                       desc="mini SD: text encoder + UNet")
    state = train(net, lambda m, b, g: ldm_loss(m, b, g, process), sample_batch, ucfg, ckpt_dir=ckpt / "unet",
                  progress=progress, extra_config={"p_uncond": cfg.p_uncond, "scaling_factor": scale},
                  allow_config_change=allow_config_change)
    best = state.best()
    summary["unet_seconds"], summary["unet_loss"] = time.time() - t0, _tail_mean(state.losses["model"])

    # 4. a diffusers pipeline folder (safetensors, fp32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=best.text_encoder.eval(), unet=best.unet.eval(),
                                   tokenizer=parts["tokenizer"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    save_vocab_files(Path(out) / "tokenizer")
    summary["params"] = {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                         for k in ("vae", "text_encoder", "unet")}
    summary["vocab"] = len(parts["tokenizer"])
    return summary


def _tail_mean(losses: list[float], k: int = 100) -> float:
    tail = losses[-k:]
    return float(sum(tail) / max(1, len(tail)))


# ----------------------------------------------------------------------------------------------------------------
# Loading, prompts, sampling, evaluation
# ----------------------------------------------------------------------------------------------------------------

def load_mini_sd(folder: str | os.PathLike = MINI_SD, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Any:
    """The shipped mini Stable Diffusion as course pieces (sd.load_sd): model, text, vae, scheduler."""
    return load_sd(paths.shipped(folder, RECREATE), device=device, dtype=dtype)


def prompt_records(n_per_label: int = 30, seed: int = 0) -> list[dict]:
    """The shipped prompt list: n_per_label captions per digit with (thickness, colour, template) drawn by a seeded
    generator, each {"prompt", "label", "thickness", "colour", "template"} (None where the caption omits it)."""
    g = torch.Generator().manual_seed(seed)
    out, seen = [], set()
    for label in range(10):
        k = 0
        while k < n_per_label:
            th, co, tp = (int(torch.randint(0, n, (1,), generator=g)) for n in (3, len(COLOURS), len(TEMPLATES)))
            need_t, need_c = template_fields(tp)
            rec = {"prompt": caption(label, THICKNESS[th], list(COLOURS)[co], tp), "label": label,
                   "thickness": THICKNESS[th] if need_t else None, "colour": list(COLOURS)[co] if need_c else None,
                   "template": tp}
            if rec["prompt"] in seen and len(seen) < 10 * 3 * len(COLOURS) * len(TEMPLATES):
                continue
            seen.add(rec["prompt"])
            out.append(rec)
            k += 1
    return out


def write_prompts(folder: str | os.PathLike = PROMPTS_DIR, n_per_label: int = 30, seed: int = 0) -> list[dict]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recs = prompt_records(n_per_label, seed)
    (folder / "digits.txt").write_text("".join(r["prompt"] + "\n" for r in recs), encoding="utf-8")
    (folder / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return recs


def load_prompts(path: str | os.PathLike = PROMPTS_JSONL) -> list[dict]:
    """The records of data/prompts/digits.jsonl: [{"prompt", "label", "thickness", "colour", "template"}, ...]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with python -m course_lib.minisd prompts")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def sample(sd: Any, prompts: Sequence[str], steps: int = 25, w: float = DEFAULT_W, seed: int = 0,
           batch: int = 256) -> Tensor:
    """Images (B, 3, 16, 16) in [-1, 1] (clamped) from the course's DDIM on grids.sd_grid(steps, "trailing") with
    classifier-free guidance weight w (diffusers' guidance_scale = 1 + w). Noise from a generator seeded `seed`."""
    proc = sd.model.process
    g = torch.Generator().manual_seed(seed)
    h = sd.model.unet.config.sample_size
    x1 = torch.randn(len(prompts), sd.model.unet.config.in_channels, h, h, generator=g)
    ts = grids.sd_grid(steps, proc, "trailing")
    out = []
    for k in range(0, len(prompts), batch):
        cond = sd.text(list(prompts[k:k + batch]))
        z = samplers.ddim(guidance.cfg(sd.model, w), x1[k:k + batch], ts, proc, cond=cond)
        out.append(sd.vae.decode(z).clamp(-1, 1))
    return torch.cat(out)


def attribute_scores(images: Tensor, records: Sequence[dict], edges: Tensor | None = None,
                     classifier: nn.Module | None = None) -> dict[str, float]:
    """Adherence to each attribute the prompts name: digit (classifier), colour (nearest ink colour), thickness
    (ink-mass tertile of the prompted class, among prompts that name it)."""
    labels = torch.tensor([r["label"] for r in records])
    res = {"adherence": adherence(images, labels, classifier)}
    col = [i for i, r in enumerate(records) if r.get("colour")]
    if col:
        want = torch.tensor([list(COLOURS).index(records[i]["colour"]) for i in col])
        res["colour_adherence"] = float((colour_of(images[col]) == want).float().mean())
    th = [i for i, r in enumerate(records) if r.get("thickness")]
    if th:
        edges = edges if edges is not None else training_digits().edges
        want = torch.tensor([THICKNESS.index(records[i]["thickness"]) for i in th])
        got = thickness_of(to_grayscale(images[th]), labels[th], edges)
        res["thickness_adherence"] = float((got == want).float().mean())
    return res


def evaluate(sd: Any, n: int = 500, steps: int = 25, w: float = DEFAULT_W, seeds: Sequence[int] = (0, 1, 2),
             records: Sequence[dict] | None = None) -> dict[str, Any]:
    """Sample n prompts of digits.jsonl (drawn with each seed) with the course's DDIM (steps, guidance w), and
    report prompt adherence (digit, colour, thickness) and KID/FD in the digits classifier's features against the
    held-out and the training digits (classifier.digits_scores), as mean and spread over the seeds."""
    return evaluate_images(lambda prompts, s: sample(sd, prompts, steps, w, seed=s), n, seeds, records,
                           steps=steps, w=w)


def evaluate_images(images: Callable[[list[str], int], Tensor], n: int = 500, seeds: Sequence[int] = (0, 1, 2),
                    records: Sequence[dict] | None = None, **fields: Any) -> dict[str, Any]:
    """The evaluation every mini-SD model shares: for each seed s, n prompt records of digits.jsonl drawn with
    seed 1000 + s, images(prompts, s) -> (n, 3, H, W) in [-1, 1], then prompt adherence and digits_scores; returns
    {"n", **fields, "seeds", "mean", "std", "runs"} (runs: one row of scores per seed)."""
    records = list(records if records is not None else load_prompts())
    clf = load_digits_classifier()
    edges = training_digits().edges
    runs = []
    for s in seeds:
        pick = torch.randint(0, len(records), (n,), generator=torch.Generator().manual_seed(1000 + s)).tolist()
        recs = [records[i] for i in pick]
        imgs = images([r["prompt"] for r in recs], s)
        row = attribute_scores(imgs, recs, edges, clf)
        row.update(digits_scores(to_grayscale(imgs), clf))
        runs.append(row)
    keys = runs[0].keys()
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    spread = {k: (sum((r[k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
    return {"n": n, **fields, "seeds": list(seeds), "mean": mean, "std": spread, "runs": runs}


def reference_scores(n: int = 500, seed: int = 0) -> dict[str, float]:
    """digits_scores of n real training digits (drawn with `seed`): the distance to the held-out digits that the
    training data itself has at this sample size (its kid_train is near 0 by construction)."""
    data = training_digits()
    pick = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))[:n]
    return digits_scores(data.x[pick])


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 10, scale: int = 4) -> Path:
    """Save images (B, 3, H, W) in [-1, 1] as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    B, _, H, W = x.shape
    rows = math.ceil(B / nrow)
    grid = torch.zeros(3, rows * (H + 1), nrow * (W + 1), dtype=torch.uint8)
    for k in range(B):
        r, c = divmod(k, nrow)
        grid[:, r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = x[k]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy()).resize((grid.shape[2] * scale, grid.shape[1] * scale),
                                                               Image.NEAREST)
    img.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.minisd",
                                     description="Train / evaluate the mini Stable Diffusion shipped in data/mini_sd/.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the VAE, then text encoder + UNet; write a diffusers pipeline folder")
    p.add_argument("--out", default=str(MINI_SD))
    p.add_argument("--mode", choices=list(MODES), default="laptop")
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (resumable); default cache_dir()/mini_sd_<seed>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="override the mode's UNet steps (a finished or "
                   "interrupted run resumes from its checkpoint and continues to this many)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--allow-config-change", action="store_true", help="resume a checkpoint written with other settings")
    q = sub.add_parser("prompts", help="write data/prompts/digits.txt and digits.jsonl")
    q.add_argument("--out", default=str(PROMPTS_DIR))
    e = sub.add_parser("evaluate", help="adherence and KID/FD of DDIM samples")
    e.add_argument("--folder", default=str(MINI_SD))
    e.add_argument("--n", type=int, default=500)
    e.add_argument("--steps", default="25", help="comma-separated step counts")
    e.add_argument("--w", default=str(DEFAULT_W), help="comma-separated guidance weights (guidance_scale = 1 + w)")
    e.add_argument("--seeds", default="0,1,2", help="comma-separated evaluation seeds (prompts and noise)")
    e.add_argument("--json", default=None, help="also write the results here")
    e.add_argument("--grid", default=None, help="save a PNG grid of 25-step samples here")
    e.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.command == "prompts":
        recs = write_prompts(args.out)
        print(f"wrote {len(recs)} prompts to {args.out}")
    elif args.command == "train":
        cfg = replace(MODES[args.mode], seed=args.seed)
        cfg = cfg if args.steps is None else replace(cfg, steps=args.steps)
        t0 = time.time()
        summary = train_mini_sd(args.out, cfg, args.ckpt_dir, allow_config_change=args.allow_config_change)
        summary["seconds"] = time.time() - t0
        summary["mode"] = args.mode
        Path(args.out, "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    else:
        sd = load_mini_sd(args.folder)
        ws, seeds = [float(v) for v in args.w.split(",")], [int(v) for v in args.seeds.split(",")]
        if args.grid:
            prompts = [caption(d, th, c, 4) for c, th in zip(COLOURS, ("thin", "regular", "thick", "regular", "thin"))
                       for d in range(10)]
            save_grid(sample(sd, prompts, 25, ws[0], seed=0), args.grid)
        results = [{"real training digits": reference_scores(args.n)}]
        print(json.dumps(results[0]))
        for w in ws:
            for s in (int(v) for v in args.steps.split(",")):
                t0 = time.time()
                r = evaluate(sd, args.n, s, w, seeds)
                r["seconds"] = time.time() - t0
                results.append(r)
                row = {k: f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" for k in r["mean"]}
                print(json.dumps({"steps": s, "w": w, "n": args.n, "seconds": round(r["seconds"], 1), **row},
                                 ensure_ascii=False))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
