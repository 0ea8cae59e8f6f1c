"""The course's own reward model for the mini Stable Diffusion: how well an image shows the prompted digit and colour.

Reward feedback learning (ReFL; Xu et al. 2023, ImageReward, Sec. 4; Hyper-SD, Ren et al. 2024, Sec. 3.2) pushes a
student's one-step prediction x0_hat up the gradient of a reward model r(image, prompt). At Stable Diffusion scale
r is ImageReward or the LAION aesthetic predictor (course_lib.scale.rewards). On the mini SD the course trains its
own, and keeps it SEPARATE from the judge: the shipped digits classifier (classifier.load_digits_classifier) stays
the measurement of adherence, so a student that learns to please the reward without drawing better digits (reward
hacking) shows up as a rising reward with a flat or falling judge adherence.

    RewardNet                        images (B, 3, 16, 16) in [-1, 1] -> digit logits (B, 11), colour logits (B, 5)
    reward(model, images, labels, colours)   (B,) in [0, 1], differentiable w.r.t. the images
    load_reward_model()              the shipped one (data/reward/, ~0.2 MB, safetensors + JSON)
    PromptReader(text_encoder)       (label, colour) of the course's captions, read back from their text embeddings
    sd_reward_fn(sd, reward_model)   reward_fn(x0_hat latents, cond) -> (B,): decodes through the mini SD's VAE with
                                     gradients (the interface of ReFL's loss)
    train_reward_model(cfg)          the builder: python -m course_lib.reward train --out data/reward
    evaluate_reward(model, sd)       held-out accuracy, agreement with the judge, scores of the teacher's samples

The reward (a number in [0, 1]; 1: certainly the prompted digit in the prompted colour):

    r(x, y, c) = p_theta(digit = y | x) * p_theta(colour = c | x)          (the colour factor is 1 when the prompt
                                                                             names no colour, c = -1)

with p_theta the softmaxes of the two heads. The digit head has an 11th class, "no digit", trained on negatives
(pixel noise, the mini SD's VAE decoding random latents, blank images), so that an image that
shows no digit scores near 0 instead of spreading its probability over the ten digits.

How it differs from the judge (classifier.DigitsCNN), on purpose: another architecture (RGB input, GroupNorm/SiLU
convolutions with global average and max pooling, two heads; the judge reads the grayscale max over channels through
strided convolutions and a flattened fully connected layer), another seed (1), other augmentations (shifts of up to
2 pixels, ink gain and colour jitter, noise of random strength, and half of the images passed through the mini SD's
VAE, as the student's decoded images are), and an 11th class. Both see only the 1500 training digits.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import minisd, paths
from .checkpoint import CheckpointError, load_tensors, save_tensors
from .classifier import load_digits_classifier
from .conditioning import Cond
from .config import seeded
from .images import load_digits
from .sd import require_codec
from .train import TrainConfig, train

REWARD_DIR = paths.data_dir() / "reward"
RECREATE = "python -m course_lib.reward train --out data/reward"
NONE = 10                                   # the "no digit" class of the digit head
N_COLOURS = len(minisd.COLOURS)
IMAGE_SHAPE = (3, 16, 16)


class RewardNet(nn.Module):
    """images (B, 3, 16, 16) in [-1, 1] -> (digit logits (B, 11): the ten digits and NONE, colour logits (B, 5):
    minisd.COLOURS in order). Four 3x3 convolutions (GroupNorm, SiLU; two of stride 2: 16 -> 8 -> 4), then the
    concatenated global average and max pool (B, 2 * width[-1]) into two linear heads."""

    def __init__(self, widths: Sequence[int] = (24, 48, 48, 64), groups: int = 8):
        super().__init__()
        self.widths, self.groups = tuple(widths), groups
        layers, c_in = [], 3
        for i, c in enumerate(self.widths):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i % 2 else 1, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.digit = nn.Linear(2 * c_in, 11)
        self.colour = nn.Linear(2 * c_in, N_COLOURS)

    def config(self) -> dict:
        return {"widths": list(self.widths), "groups": self.groups}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"the reward model takes images (B, 3, 16, 16) in [-1, 1] (the mini SD's decoded "
                             f"images); got {tuple(x.shape)}")
        h = self.body(x)                                                    # (B, C, 4, 4)
        f = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)      # (B, 2C)
        return self.digit(f), self.colour(f)


def reward(model: nn.Module, images: Tensor, labels: Tensor | Sequence[int],
           colours: Tensor | Sequence[int] | None = None, log: bool = False) -> Tensor:
    """r = p(digit = labels | images) * p(colour = colours | images), (B,) in [0, 1], differentiable w.r.t. images
    (B, 3, 16, 16) in [-1, 1] (not clamped here: clamp outside if wanted, as the decoded images are). labels (B,)
    digits 0..9; colours (B,) indices into minisd.COLOURS, -1 (or None for all) where the prompt names none.

    log=True returns log r in (-inf, 0] (from the log-softmaxes): the same ordering, but its gradient does not vanish
    where r does. A blurry one-step image that the model reads as "no digit" with probability 0.99 has r near 1e-5
    and a gradient of r near zero; the gradient of log r still points toward the prompted digit."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=images.device)
    if labels.shape != (len(images),) or bool(((labels < 0) | (labels > 9)).any()):
        raise ValueError(f"labels must be (B,) = ({len(images)},) digits 0..9; got {tuple(labels.shape)}")
    digit, colour = model(images)
    log_r = digit.log_softmax(1).gather(1, labels[:, None])[:, 0]             # (B,)
    if colours is not None:
        colours = torch.as_tensor(colours, dtype=torch.long, device=images.device)
        if colours.shape != labels.shape or bool(((colours < -1) | (colours >= N_COLOURS)).any()):
            raise ValueError(f"colours must be (B,) indices into minisd.COLOURS or -1; got {colours.tolist()[:8]}")
        lc = colour.log_softmax(1).gather(1, colours.clamp_min(0)[:, None])[:, 0]
        log_r = log_r + torch.where(colours >= 0, lc, torch.zeros_like(lc))
    return log_r if log else log_r.exp()


def targets(records: Sequence[dict]) -> tuple[Tensor, Tensor]:
    """(labels (B,), colours (B,), -1 where the prompt names no colour) of prompt records (minisd.load_prompts)."""
    names = list(minisd.COLOURS)
    return (torch.tensor([r["label"] for r in records]),
            torch.tensor([names.index(r["colour"]) if r.get("colour") else -1 for r in records]))


# ----------------------------------------------------------------------------------------------------------------
# The mini SD's interface: prompts read back from text embeddings, decoding with gradients
# ----------------------------------------------------------------------------------------------------------------

class PromptReader:
    """Reads (label, colour) back from the text embeddings of the course's captions (minisd.all_captions): the
    reward needs the prompted digit and colour, the student's Cond carries only the embedding. Each embedding (B, L,
    D) is matched with the nearest of the captions' own embeddings; one that is not a caption's (the empty prompt,
    a caption of another text encoder) is refused rather than guessed. The tolerance, 1% of the embedding's norm, is
    above bfloat16's rounding (0.2% measured) and below half the distance between any two captions of the mini SD
    (4% at the closest; the empty prompt is 38% away)."""

    def __init__(self, text: Any, rel_tol: float = 1e-2):
        captions, labels, colours, seen = [], [], [], set()
        names = list(minisd.COLOURS)
        for d in range(10):
            for th in minisd.THICKNESS:
                for c in names:
                    for k in range(len(minisd.TEMPLATES)):
                        s = minisd.caption(d, th, c, k)
                        if s not in seen:
                            seen.add(s)
                            captions.append(s)
                            labels.append(d)
                            colours.append(names.index(c) if minisd.template_fields(k)[1] else -1)
        with torch.no_grad():
            emb = torch.cat([text.embed(captions[i:i + 500]) for i in range(0, len(captions), 500)])
        self.captions, self.table = captions, emb.flatten(1).float()               # (U, L * D)
        self.labels, self.colours = torch.tensor(labels), torch.tensor(colours)
        self.rel_tol = rel_tol

    def __call__(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """(labels (B,), colours (B,)) of text embeddings (B, L, D) (cond.text)."""
        flat = text.detach().flatten(1).float().to(self.table.device)
        if flat.shape[1] != self.table.shape[1]:
            raise ValueError(f"these text embeddings have shape {tuple(text.shape[1:])}, the captions' "
                             f"{self.table.shape[1]} values: another text encoder?")
        dist = torch.cdist(flat, self.table)                                        # (B, U)
        best, idx = dist.min(dim=1)
        scale = self.table.norm(dim=1)[idx]
        bad = (best > self.rel_tol * scale).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"the text embeddings of samples {bad[:8]} are not embeddings of the course's captions "
                             "(the empty prompt of guidance, or another text encoder): the reward model reads the "
                             "prompted digit and colour from the caption")
        return self.labels[idx.cpu()].to(text.device), self.colours[idx.cpu()].to(text.device)


def sd_reward_fn(sd: Any, reward_model: nn.Module, clamp: bool = True, log: bool = False
                 ) -> Callable[[Tensor, Cond], Tensor]:
    """reward_fn(x0_hat, cond) -> (B,) rewards in [0, 1] (log=True: log r in (-inf, 0], see `reward`) with
    gradients w.r.t. x0_hat: the predicted latents x0_hat (B, 4, h, w) (scaled, as the UNet sees them) go through
    the mini SD's VAE decoder (sd.vae.decode, gradients on), clamped to [-1, 1] as the samplers' images are, then
    `reward` with the prompt's digit and colour read from cond.text (PromptReader). The reward model and the VAE
    stay frozen; only the student gets gradients."""
    require_codec(sd)
    reader = PromptReader(sd.text)
    reward_model.eval().requires_grad_(False)

    def reward_fn(x0_hat: Tensor, cond: Cond) -> Tensor:
        if not isinstance(cond, Cond) or cond.text is None:
            raise ValueError("the mini SD's reward needs the prompts' Cond (text embeddings): pass "
                             "cond=sd.text(prompts)")
        labels, colours = reader(cond.text)
        images = sd.vae.decode(x0_hat)                                           # (B, 3, 16, 16), with gradients
        images = images.clamp(-1, 1) if clamp else images
        return reward(reward_model, images.float(), labels, colours, log=log)

    reward_fn.reader = reader
    return reward_fn


# ----------------------------------------------------------------------------------------------------------------
# Training data: the training digits in every ink colour, with augmentations and negatives
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RewardConfig:
    widths: tuple[int, ...] = (24, 48, 48, 64)
    groups: int = 8
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    ema_decay: float = 0.995
    weight_decay: float = 1e-4
    p_negative: float = 0.15         # fraction of a batch that shows no digit (class NONE)
    p_vae: float = 0.5               # fraction of the digits passed through the mini SD's VAE
    shift: int = 2                   # random shifts of up to this many pixels per axis
    noise_max: float = 0.1           # Gaussian noise of std ~ U[0, noise_max]
    seed: int = 1                    # the judge used seed 0


@torch.no_grad()
def vae_round_trip(images: Tensor, vae: Any, batch: int = 500) -> Tensor:
    """Images (N, 3, 16, 16) through the mini SD's VAE (posterior mean, decoded, clamped): how decoded images look."""
    out = [vae.decode(vae.encode(images[i:i + batch])).clamp(-1, 1) for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def random_decodes(vae: Any, n: int, generator: torch.Generator) -> Tensor:
    """The VAE's decoding of n latents drawn from N(0, I) (scaled latents): what a generator that learnt nothing
    shows, (n, 3, 16, 16) clamped."""
    z = torch.randn(n, 4, 8, 8, generator=generator)
    return vae.decode(z).clamp(-1, 1)


def _shift(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x, (k, k, k, k), value=-1.0)
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=g)
    rows = dy[:, None] + torch.arange(h)                                            # (N, H)
    cols = dx[:, None] + torch.arange(w)                                            # (N, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def training_sampler(cfg: RewardConfig, vae: Any | None) -> Callable[[int, torch.Generator], tuple]:
    """sample_batch(n, g) -> (images (n, 3, 16, 16), digit targets (n,) in 0..10, colour targets (n,), -100 for
    negatives) over the mini SD's training digits (minisd.training_digits, colourized as it renders them), half of
    them through its VAE (precomputed), with shifts, ink gain and colour jitter, and noise; a fraction p_negative
    are negatives of class NONE."""
    data = minisd.training_digits()
    N, C = len(data.x), N_COLOURS
    table = minisd.COLOUR_TABLE
    gray = data.x                                                                    # (N, 1, 16, 16)
    rec = None
    if vae is not None and cfg.p_vae > 0:
        rec = torch.stack([vae_round_trip(minisd.colourize(gray, table[c].expand(N, 3)), vae) for c in range(C)], 1)
    pool = random_decodes(vae, 2000, torch.Generator().manual_seed(cfg.seed + 100)) if vae is not None else None

    def sample_batch(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(0, N, (n,), generator=g)
        col = torch.randint(0, C, (n,), generator=g)
        gain = 0.6 + 0.4 * torch.rand(n, 1, generator=g)                            # ink brightness
        jitter = 0.08 * (2 * torch.rand(n, 3, generator=g) - 1)
        ink = (table[col] * gain + jitter).clamp(0, 1)
        x = minisd.colourize(gray[idx], ink)                                         # (n, 3, 16, 16)
        if rec is not None:
            use = torch.rand(n, generator=g) < cfg.p_vae
            x = torch.where(use[:, None, None, None], rec[idx, col], x)
        x = _shift(x, cfg.shift, g)
        y, c = data.y[idx].clone(), col.clone()
        # negatives: pixel noise, the VAE's decoding of random latents, blank (no overlays of two digits: a
        # first model trained with them read 4.7% of the held-out digits, most of them eights, as no digit)
        neg = torch.rand(n, generator=g) < cfg.p_negative
        kind = torch.randint(0, 3, (n,), generator=g)
        noise_img = (torch.rand(n, 3, 16, 16, generator=g) * 2 - 1) * torch.rand(n, 1, 1, 1, generator=g)
        blank = -torch.ones_like(x)
        decoded = pool[torch.randint(0, len(pool), (n,), generator=g)] if pool is not None else noise_img
        negs = torch.stack([noise_img, decoded, blank])[kind, torch.arange(n)]
        x = torch.where(neg[:, None, None, None], negs, x)
        y[neg], c[neg] = NONE, -100
        x = x + torch.rand(n, 1, 1, 1, generator=g) * cfg.noise_max * torch.randn(x.shape, generator=g)
        return x.clamp(-1, 1), y, c

    return sample_batch


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor], generator: torch.Generator) -> Tensor:
    x, y, c = batch
    digit, colour = model(x)
    lc = F.cross_entropy(colour, c.clamp_min(0), reduction="none") * (c >= 0)
    return F.cross_entropy(digit, y, reduction="none") + lc                       # (B,)


def train_reward_model(cfg: RewardConfig = RewardConfig(), sd: Any | None = None, out: str | os.PathLike | None = None,
                       progress: bool = True) -> tuple[RewardNet, dict]:
    """Train the reward model on the mini SD's rendering of the training digits (sd: the mini SD, for its VAE;
    default minisd.load_mini_sd()); evaluate it on the held-out digits (held_out_scores) and write out/ (EMA
    weights, safetensors + config.json with the measurements) unless out is None. Returns (model, summary)."""
    sd = sd if sd is not None else minisd.load_mini_sd()
    t0 = time.time()
    with seeded(cfg.seed):
        model = RewardNet(cfg.widths, cfg.groups)
    run = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr, lr_schedule="cosine",
                      warmup=min(100, cfg.steps // 10), ema_decay=cfg.ema_decay, weight_decay=cfg.weight_decay,
                      seed=cfg.seed, desc="reward model")
    state = train(model, _loss, training_sampler(cfg, sd.vae), run, progress=progress)
    best = state.best().eval().requires_grad_(False)
    seconds = time.time() - t0
    summary = {"arch": "reward_net", "model": best.config(), "config": asdict(cfg), "train_seconds": seconds,
               "params": sum(p.numel() for p in best.parameters()), "held_out": held_out_scores(best, sd),
               "reward": "p(digit = prompted | x) * p(colour = prompted | x), in [0, 1] (colour factor 1 when the "
                         "prompt names no colour)", "recreate": RECREATE}
    if out is not None:
        save_tensors(out, best.state_dict(), summary)
    return best, summary


def load_reward_model(folder: str | os.PathLike = REWARD_DIR, device: str | torch.device = "cpu") -> RewardNet:
    """The shipped reward model (eval, no grad). CheckpointError when missing or corrupted."""
    tensors, config = load_tensors(paths.shipped(folder, RECREATE), RECREATE)
    if config.get("arch") != "reward_net":
        raise CheckpointError(f"{folder} holds no reward model of the course (arch {config.get('arch')!r})")
    model = RewardNet(**config["model"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{Path(folder) / 'model.safetensors'} does not hold a RewardNet ({e}). "
                              f"To recreate it: {RECREATE}") from e
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch: int = 1000) -> tuple[Tensor, Tensor]:
    outs = [model(images[i:i + batch]) for i in range(0, len(images), batch)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def held_out_images(sd: Any | None) -> dict[str, Tensor]:
    """The 297 held-out digits in every ink colour (1485 images, colour-major), rendered (x) and through the mini
    SD's VAE (x_vae, when sd is given), with their labels y and colours c."""
    x, y = load_digits(16, "test")
    n = len(x)
    imgs = torch.cat([minisd.colourize(x, minisd.COLOUR_TABLE[c].expand(n, 3)) for c in range(N_COLOURS)])
    out = {"x": imgs, "y": y.repeat(N_COLOURS), "c": torch.arange(N_COLOURS).repeat_interleave(n)}
    if sd is not None:
        out["x_vae"] = vae_round_trip(imgs, sd.vae)
    return out


@torch.no_grad()
def held_out_scores(model: nn.Module, sd: Any | None = None) -> dict[str, float]:
    """On the held-out digits in every colour (rendered, and through the VAE when sd is given): the reward model's
    digit accuracy (argmax over the ten digits), colour accuracy, how often it says "no digit", its agreement with
    the judge (same argmax digit), the judge's own accuracy, and the fraction of random images (pixel noise; the
    VAE's decoding of random latents) it reads as NONE."""
    judge = load_digits_classifier()
    data = held_out_images(sd)
    res = {}
    for key in [k for k in ("x", "x_vae") if k in data]:
        tag = "" if key == "x" else "_vae"
        d, c = _predict(model, data[key])
        pred = d[:, :10].argmax(1)
        read = judge(minisd.to_grayscale(data[key])).argmax(1)
        res[f"digit_accuracy{tag}"] = float((pred == data["y"]).float().mean())
        res[f"colour_accuracy{tag}"] = float((c.argmax(1) == data["c"]).float().mean())
        res[f"says_none{tag}"] = float((d.argmax(1) == NONE).float().mean())
        res[f"agreement_with_judge{tag}"] = float((pred == read).float().mean())
        res[f"judge_accuracy{tag}"] = float((read == data["y"]).float().mean())
        res[f"mean_reward{tag}"] = float(reward(model, data[key], data["y"], data["c"]).mean())
    g = torch.Generator().manual_seed(12345)
    noise = (torch.rand(500, 3, 16, 16, generator=g) * 2 - 1)
    res["noise_says_none"] = float((_predict(model, noise)[0].argmax(1) == NONE).float().mean())
    if sd is not None:
        dec = random_decodes(sd.vae, 500, g)
        res["random_decodes_say_none"] = float((_predict(model, dec)[0].argmax(1) == NONE).float().mean())
    res["n_images"] = len(data["y"])
    return res


@torch.no_grad()
def evaluate_reward(model: nn.Module, sd: Any, n: int = 300, steps: int = 25, w: float = minisd.DEFAULT_W,
                    seed: int = 0) -> dict[str, Any]:
    """The reward model against the judge on the mini SD teacher's samples: n prompts of data/prompts (drawn with
    seed), sampled with the course's DDIM (steps, guidance w). Reports the mean reward of the samples with their own
    prompts, with wrong prompts (another digit, and another colour where the prompt names one), of random images
    (the VAE's decoding of random latents; pixel noise) and of real held-out digits; the judge's adherence and the
    reward model's agreement with the judge on the samples; and the time to score them."""
    records = minisd.load_prompts()
    pick = torch.randint(0, len(records), (n,), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    recs = [records[i] for i in pick]
    labels, colours = targets(recs)
    t0 = time.time()
    images = minisd.sample(sd, [r["prompt"] for r in recs], steps, w, seed=seed)
    sample_seconds = time.time() - t0
    judge = load_digits_classifier()
    read = judge(minisd.to_grayscale(images)).argmax(1)
    g = torch.Generator().manual_seed(seed)
    wrong_digit = (labels + torch.randint(1, 10, (n,), generator=g)) % 10
    wrong_colour = torch.where(colours >= 0, (colours + torch.randint(1, N_COLOURS, (n,), generator=g)) % N_COLOURS,
                               colours)
    t0 = time.time()
    r_right = reward(model, images, labels, colours)
    score_seconds = time.time() - t0
    d, c = _predict(model, images)
    named = colours >= 0
    held = held_out_images(None)
    pick_h = torch.randperm(len(held["y"]), generator=g)[:n]
    res = {
        "n": n, "steps": steps, "w": w, "seed": seed,
        "reward_teacher_samples": float(r_right.mean()),
        "reward_wrong_digit_prompt": float(reward(model, images, wrong_digit, colours).mean()),
        "reward_wrong_colour_prompt": float(reward(model, images[named], labels[named], wrong_colour[named]).mean()),
        "reward_random_decodes": float(reward(model, random_decodes(sd.vae, n, g), labels, colours).mean()),
        "reward_pixel_noise": float(reward(model, torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, labels,
                                           colours).mean()),
        "reward_real_held_out": float(reward(model, held["x"][pick_h], held["y"][pick_h], held["c"][pick_h]).mean()),
        "judge_adherence": float((read == labels).float().mean()),
        "reward_adherence": float((d[:, :10].argmax(1) == labels).float().mean()),
        "reward_colour_adherence": float((c.argmax(1)[named] == colours[named]).float().mean()),
        "judge_colour_adherence": float((minisd.colour_of(images[named]) == colours[named]).float().mean()),
        "agreement_with_judge": float((d[:, :10].argmax(1) == read).float().mean()),
        "sample_seconds": sample_seconds, "score_seconds": score_seconds,
    }
    return res


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.reward",
                                     description="Train / evaluate the course's reward model for the mini SD "
                                                 "(shipped in data/reward/).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on the mini SD's rendering of the training digits; write --out")
    p.add_argument("--out", default=str(REWARD_DIR))
    p.add_argument("--steps", type=int, default=RewardConfig.steps)
    p.add_argument("--seed", type=int, default=RewardConfig.seed)
    p.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("evaluate", help="scores of the 25-step guided teacher's samples vs wrong prompts / random")
    e.add_argument("--folder", default=str(REWARD_DIR))
    e.add_argument("--n", type=int, default=300)
    e.add_argument("--seeds", default="0,1,2")
    e.add_argument("--steps", default="25", help="comma-separated DDIM step counts of the teacher (guidance w = 4)")
    e.add_argument("--json", default=None)
    e.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sd = minisd.load_mini_sd()
    if args.command == "train":
        _, summary = train_reward_model(replace(RewardConfig(), steps=args.steps, seed=args.seed), sd, args.out)
        size = (Path(args.out) / "model.safetensors").stat().st_size
        print(json.dumps(summary["held_out"], indent=1))
        print(f"trained in {summary['train_seconds']:.0f} s; wrote {args.out} ({size / 1e3:.0f} kB)")
    else:
        model = load_reward_model(args.folder)
        out = []
        for steps in (int(v) for v in args.steps.split(",")):
            runs = [evaluate_reward(model, sd, args.n, steps, seed=int(s)) for s in args.seeds.split(",")]
            keys = [k for k in runs[0] if isinstance(runs[0][k], float) and k not in ("w",)]
            mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
            std = {k: (sum((r[k] - mean[k]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for k in keys}
            out.append({"steps": steps, "n": args.n, "mean": mean, "std": std, "runs": runs})
            print(json.dumps({"steps": steps, **{k: f"{mean[k]:.4f} ± {std[k]:.4f}" for k in keys}}, indent=1,
                             ensure_ascii=False))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
