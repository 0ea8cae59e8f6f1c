"""Checker of notebook 13 (scaling up): images to Stable Diffusion's latents (the VAE's posterior mean of images
mapped to [-1, 1], times the VAE's scaling_factor). Cases use a tiny random diffusers AutoencoderKL."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import seeded
from ..sd import LatentCodec
from .core import accept, checker, fall_back, first_look, fresh_generator, max_diff, named_slip

SCALE = 0.37   # the tiny VAE's scaling_factor: not 1 (nor SD 1.5's 0.18215), so every use of it shows


def _tiny_vae() -> torch.nn.Module:
    """A tiny random diffusers AutoencoderKL (3 -> 4 channels, downsampling 2) with scaling_factor SCALE."""
    from diffusers import AutoencoderKL

    with seeded(0):
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                             layers_per_block=1, norm_num_groups=4, scaling_factor=SCALE).eval()


def to_latents_ref(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The reference of exercise 13.1: images (B, 3, H, W) in [0, 1] -> (mean of q(z | 2 x - 1)) * scaling_factor
    (sd.LatentCodec.encode on [-1, 1] images)."""
    return LatentCodec(vae).encode(2 * images - 1)


@checker("13.1")
def check_to_latents(student: Callable, seed: int | None = None) -> Callable:
    """Exercise 13.1: student(vae, images) -> latents: images (B, 3, H, W) in [0, 1] (as a pipeline returns them)
    mapped to [-1, 1], encoded by the VAE, the posterior's MEAN taken, times vae.config.scaling_factor. Checked
    against sd.LatentCodec on a tiny random AutoencoderKL, with the plausible slips named."""
    g = fresh_generator(seed)
    vae = _tiny_vae()
    images = torch.rand(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        want = to_latents_ref(vae, images)
        mean = lambda x: vae.encode(x).latent_dist.mean
        slips = [
            (mean(images) * SCALE, "your latents are those of the images as given, in [0, 1]; the VAE was trained on "
                                   "images in [-1, 1]: map them there first (2 x - 1)."),
            (mean(2 * images - 1), "your latents are the VAE's unscaled posterior mean: multiply by "
                                   "vae.config.scaling_factor, which brings them to about unit variance, the scale "
                                   "the UNet's noise schedule was trained for."),
            (mean(2 * images - 1) / SCALE, "you divided by vae.config.scaling_factor: encoding MULTIPLIES by it "
                                           "(decoding divides)."),
            (mean(images) / SCALE, "your latents are those of [0, 1] images divided by the scaling factor: map the "
                                   "images to [-1, 1] and MULTIPLY by vae.config.scaling_factor."),
        ]
    with torch.no_grad():
        problem = first_look(student, (vae, images.clone()), want,
                             f"for images {tuple(images.shape)} on a tiny AutoencoderKL (4 latent channels, the "
                             "spatial size divided by its downsampling 2)",
                             zeros="The UNet would see no image at all: latents come from the VAE's encoder.")
        if problem:
            return fall_back("13.1", to_latents_ref, problem)
        got, again = (student(vae, images.clone()).detach().float() for _ in range(2))
    if not torch.isfinite(got).all():
        return fall_back("13.1", to_latents_ref, "your latents contain inf or nan.")
    tol = dict(atol=1e-5, rtol=1e-4)
    if not torch.allclose(got, again, **tol):
        return fall_back("13.1", to_latents_ref, "your latents change from one call to the next: you drew a sample of "
                                                 "the posterior (latent_dist.sample()). Encode with its mean, "
                                                 "latent_dist.mean, so that an image has one latent.")
    if torch.allclose(got, want, **tol):
        return accept("13.1", student, "correct (equal to sd.LatentCodec on a tiny AutoencoderKL).")
    why = named_slip(got, slips, lambda a, b: torch.allclose(a, b, **tol))
    if why:
        return fall_back("13.1", to_latents_ref, why)
    return fall_back("13.1", to_latents_ref, f"your latents differ from the reference by up to "
                                             f"{max_diff(got, want):.3g}: the "
                                             "posterior mean of the images mapped to [-1, 1], times "
                                             "vae.config.scaling_factor.")
