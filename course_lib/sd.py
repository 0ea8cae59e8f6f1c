"""Stable Diffusion as a course model: diffusers' parts behind the course's interfaces (cf. k-diffusion's external.py).

    SDDenoiser(unet, process, parameterization)   models.Denoiser(SDUNet(unet), ...): model(x, t, cond) -> Pred,
                                                  the one call of every course model
        x     (B, 4, h, w) VAE latents (already scaled by the VAE's scaling_factor)
        t     (B,) course time in [0, 1]; the UNet sees the process's timestep = 1000 t - 1 (processes.SDDiscrete,
              RectifiedFlow(timestep_map="sd") for SD read as a flow), float32
        cond  a conditioning.Cond with text (encoder_hidden_states) and, for an LCM student, timestep_cond
    SDUNet(unet)                                  the adapter: diffusers' UNet2DConditionModel as a course backbone
    TextEncoder(tokenizer, text_model)            prompts -> Cond(text=..., null_text=<embedding of "">)
    LatentCodec(vae)                              images in [-1, 1] <-> scaled latents
    load_sd(source)                               all three (and the scheduler's config) from a diffusers folder/hub id
    adapter_disabled(model), AdapterOff(model)    the teacher of a LoRA student: the same UNet with its adapter off

The schedule comes from the scheduler's config (scaled_linear betas -> SDDiscrete) and the parameterization from its
prediction_type ("epsilon" -> "eps", "v_prediction" -> "v"). Guidance is the course's `guidance.cfg(model, w)` with
diffusers' guidance_scale = 1 + w; the course's DDIM on `grids.sd_grid(n, process, "trailing")` reproduces diffusers'
StableDiffusionPipeline with DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True) (tests/test_sd.py).

Pretrained parts are referenced, never copied: a saved course config records the source (hub id or local folder),
subfolder and revision. Students save in diffusers' formats so diffusers loads them without the course:
`save_lora` writes only a LoRA adapter (`pipe.load_lora_weights(folder)`), `save_student` a whole pipeline folder
with the student's UNet (`StableDiffusionPipeline.from_pretrained(folder)`).

transformers, diffusers and peft are imported inside functions: importing course_lib never imports them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .conditioning import Cond
from .config import seeded
from .models import Denoiser
from .predictions import Pred
from .processes import AffineProcess, RectifiedFlow, SDDiscrete, make_process

CONFIG = "config.json"                   # the course's reference beside diffusers' files
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}   # diffusers -> course
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")                         # attention projections
# A rectified-flow UNet (InstaFlow's 2-RF and one-step student) ships with this stock diffusers scheduler: UniPC on
# flow sigmas, first order (= Euler on a rectified flow), sigmas from 1 down to 0, velocity output. With
# num_inference_steps=1 and guidance_scale <= 1, StableDiffusionPipeline then takes ONE Euler step from pure noise:
# x0 = x1 - s u(x1, timestep 999) with s = 1 - 1e-6 (UniPC nudges the first sigma off 1 and casts the timestep
# 1000 s to the integer 999): the course's one_step, x1 - u(x1, t = 1) at timestep 1000 t - 1 = 999, to ~1e-6.
FLOW_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                  "prediction_type": "flow_prediction", "flow_shift": 1.0, "final_sigmas_type": "zero",
                  "solver_order": 1, "lower_order_final": True, "num_train_timesteps": 1000}


# ----------------------------------------------------------------------------------------------------------------
# The schedule and parameterization of a diffusers scheduler config
# ----------------------------------------------------------------------------------------------------------------

def is_flow_scheduler(config: dict) -> bool:
    """True for a scheduler config of a rectified-flow UNet (FLOW_SCHEDULER: flow sigmas, flow_prediction)."""
    return config.get("prediction_type") == "flow_prediction"


def flow_scheduler(config: dict | None = None) -> Any:
    """The stock diffusers scheduler a rectified-flow student ships with (FLOW_SCHEDULER), from a teacher's config."""
    from diffusers import UniPCMultistepScheduler

    settings = {k: v for k, v in FLOW_SCHEDULER.items() if not k.startswith("_")}
    return UniPCMultistepScheduler.from_config({**(config or {}), **settings})


def process_from_scheduler(config: dict) -> SDDiscrete | RectifiedFlow:
    """The course process of a diffusers (DDPM-type) scheduler config: betas "scaled_linear" or "linear"; a flow
    scheduler (is_flow_scheduler) gives the rectified flow."""
    if is_flow_scheduler(config):
        return RectifiedFlow()
    if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
        raise ValueError("this scheduler uses trained or zero-SNR-rescaled betas; the course's SDDiscrete covers "
                         "the 'scaled_linear' and 'linear' schedules only")
    return SDDiscrete(beta_start=float(config.get("beta_start", 0.00085)), beta_end=float(config.get("beta_end", 0.012)),
                      num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                      beta_schedule=config.get("beta_schedule", "scaled_linear"))


def parameterization_from_scheduler(config: dict) -> str:
    if is_flow_scheduler(config):
        return "velocity"
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config; known: {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[kind]


def _reference(source: str | os.PathLike, subfolder: str | None, revision: str | None) -> dict:
    """Where a pretrained part lives: a local folder (stored as an absolute path) or a hub id."""
    path = Path(source).expanduser()
    src = str(path.resolve()) if path.exists() else str(source)
    return {"source": src, "subfolder": subfolder, "revision": revision}


# ----------------------------------------------------------------------------------------------------------------
# The denoiser
# ----------------------------------------------------------------------------------------------------------------

class SDUNet(nn.Module):
    """The adapter (k-diffusion's external.py idea): diffusers' UNet2DConditionModel behind the course's backbone
    signature net(x, timestep, class_labels=None, encoder_hidden_states=..., timestep_cond=None) -> tensor, so that
    Stable Diffusion is a backbone under the one models.Denoiser (the process supplies the timestep, 1000 t - 1).

    A half-precision UNet (fp16 weights for sampling) takes its inputs in its dtype; the solver state x may stay
    float32, and the course's conversions (to_pred) then run in float32."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, timestep_cond: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        if encoder_hidden_states is None:
            raise ValueError("Stable Diffusion is conditioned on text: pass a Cond with text embeddings "
                             "(sd.TextEncoder(prompts), or Cond(text=..., null_text=...))")
        if guidance is not None:
            raise ValueError("this UNet takes no guidance weight w as an input; an LCM reads cond.w through its "
                             "w-embedding (distill.lcm.LCMModel makes timestep_cond from it)")
        if class_labels is not None and getattr(self.unet, "class_embedding", None) is None:
            raise ValueError("this UNet has no class embedding: a Cond for Stable Diffusion holds text, not labels")
        if len(encoder_hidden_states) != len(x):
            raise ValueError(f"the Cond has batch size {len(encoder_hidden_states)}, the latents {len(x)}")
        dtype = x.dtype if x.dtype == getattr(self.unet, "dtype", x.dtype) else self.unet.dtype
        out = self.unet(x.to(dtype), timestep.to(torch.float32), encoder_hidden_states=encoder_hidden_states.to(dtype),
                        class_labels=class_labels,
                        timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype))
        return out.sample


def sd_process(process: AffineProcess) -> AffineProcess:
    """The process as a Stable Diffusion UNet reads it: a rectified flow with SD's own time map (timestep
    1000 t - 1, RectifiedFlow(timestep_map="sd")); SDDiscrete unchanged."""
    if isinstance(process, RectifiedFlow) and process.timestep_map != "sd":
        return RectifiedFlow(timestep_map="sd")
    return process


class SDDenoiser(Denoiser):
    """Stable Diffusion as a course model: models.Denoiser(SDUNet(unet), process, parameterization), called
    model(x, t, cond) -> Pred(x0, eps) like every course model. This constructor only adds what a pretrained UNet
    needs to be saved by reference: `reference` (where its weights live), `lora` (the adapter's settings), and
    `unet` (the diffusers module itself).

    process SDDiscrete with parameterization eps / v / x0 (Stable Diffusion itself), or RectifiedFlow with
    "velocity": the UNet read as a rectified flow's velocity u = eps - x0 (InstaFlow's reading, with SD's own time
    map, timestep 1000 t - 1: `sd_process`, `as_rectified_flow`)."""

    def __init__(self, unet: nn.Module, process: AffineProcess, parameterization: str = "eps",
                 reference: dict | None = None):
        valid = ("velocity",) if isinstance(process, RectifiedFlow) else tuple(PREDICTION_TYPES.values())
        if parameterization not in valid:
            raise ValueError(f"SDDenoiser parameterization with the {process.name!r} process is one of "
                             f"{sorted(valid)}; got {parameterization!r}")
        super().__init__(SDUNet(unet), sd_process(process), parameterization)
        self.reference = reference        # {"source", "subfolder", "revision"} of the UNet's pretrained weights
        self.lora: dict | None = None     # LoRA settings once add_lora was called

    @property
    def unet(self) -> nn.Module:
        return self.net.unet

    def raw(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The UNet's native output (eps or v) at latents x (B, 4, h, w), course times t (B,) (taken in float32)."""
        return super().raw(x, t.to(torch.float32), cond)

    def config(self) -> dict:
        """JSON description: the UNet's reference (not its weights), the process, the parameterization, the LoRA."""
        return {"arch": "sd-unet", "unet": self.reference, "process": self.process.config(),
                "parameterization": self.parameterization, "lora": self.lora}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts written before the UNet moved under the adapter name it "unet.*"; now "net.unet.*"
        for key in [k for k in state_dict if k.startswith(prefix + "unet.")]:
            state_dict[prefix + "net." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def as_rectified_flow(model: SDDenoiser) -> SDDenoiser:
    """The same UNet (shared, not copied) read as a rectified flow: process RectifiedFlow(timestep_map="sd"),
    parameterization "velocity" (SD's map: t = 1 is timestep 999). InstaFlow's initialisation of the 2-RF from Stable
    Diffusion's weights (Liu et al. 2023): a starting point for reflow training, not yet a flow (cf.
    distill.reflow.as_flow for course models)."""
    flow = SDDenoiser(model.unet, RectifiedFlow(timestep_map="sd"), "velocity", model.reference)
    flow.lora = model.lora
    return flow


def lcm_timestep_cond(w: Tensor, dim: int) -> Tensor:
    """LCM's embedding of the guidance weight w (B,) -> (B, dim) for a UNet with time_cond_proj_dim = dim: sinusoidal
    features of 1000 w (Luo et al. 2023; diffusers' get_guidance_scale_embedding, called with guidance_scale - 1 = w)."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) / (half - 1) * torch.arange(half, dtype=torch.float32))
    args = (1000.0 * w.float())[:, None] * freqs.to(w.device)[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def step_cond(d: Tensor, dim: int) -> Tensor:
    """A flow map's step d = timestep(t) - timestep(s) (B,), in diffusers' timestep units (1000 (t - s)), as the
    UNet's timestep_cond (B, dim): lcm_timestep_cond of w = d / 1000. It is exactly what a plain
    StableDiffusionPipeline makes for a UNet with time_cond_proj_dim from guidance_scale = 1 + d / 1000
    (get_guidance_scale_embedding of guidance_scale - 1), so on the uniform trailing grid of n steps (d = 1000 / n)
    the plain pipeline at guidance_scale = 1 + 1 / n feeds the step (and, with that embedding, runs no CFG pair)."""
    return lcm_timestep_cond(d.float() / 1000.0, dim)


class SDFlowMapUNet(SDUNet):
    """SDUNet of a flow map X(x_t, t -> s): a UNet with time_cond_proj_dim reads the step d = timestep - end_time
    through timestep_cond (`step_cond`); its cond_proj starts at zero, so at first it is the base UNet for every s.
    Without end_time (s None) it is called without timestep_cond: the base UNet's own prediction (with the LoRA
    switched off, the teacher)."""

    flow_map = True

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, timestep_cond: Tensor | None = None,
                guidance: Tensor | None = None, end_time: Tensor | None = None) -> Tensor:
        if end_time is not None:
            if timestep_cond is not None:
                raise ValueError("a flow-map UNet makes its timestep_cond from the end time s; pass one of them")
            d = timestep.reshape(-1).expand(len(x)) - end_time.reshape(-1).expand(len(x))
            timestep_cond = step_cond(d, self.unet.config.time_cond_proj_dim).to(x.device)
        return super().forward(x, timestep, class_labels, encoder_hidden_states, timestep_cond, guidance)


class SDFlowMap(SDDenoiser):
    """A Stable Diffusion flow-map student as a course model (models.is_flow_map): an SDDenoiser whose backbone is
    `SDFlowMapUNet` (its UNet has time_cond_proj_dim), called model(x, t, cond) with the end time in cond.s;
    one DDIM step t -> s of its Pred is the jump (steps.flow_map, samplers.flow_map)."""

    def __init__(self, unet: nn.Module, process: AffineProcess, parameterization: str = "eps",
                 reference: dict | None = None):
        if unet.config.get("time_cond_proj_dim") is None:
            raise ValueError("a flow-map SD UNet reads its step through timestep_cond: build it with "
                             "time_cond_proj_dim (e.g. distill.lcm.lcm_student's zero-initialised cond_proj)")
        super().__init__(unet, process, parameterization, reference)
        self.net = SDFlowMapUNet(unet)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder and VAE
# ----------------------------------------------------------------------------------------------------------------

class TextEncoder(nn.Module):
    """CLIP tokenizer + text model: prompts -> Cond(text (B, L, D), null_text = embedding of "" (1, L, D)), encoded
    as StableDiffusionPipeline.encode_prompt does (padded to the tokenizer's model_max_length)."""

    def __init__(self, tokenizer: Any, text_model: nn.Module):
        super().__init__()
        if len(tokenizer) <= 100:
            raise ValueError(f"this tokenizer has only {len(tokenizer)} tokens: a tokenizer loaded from the hub while "
                             "offline comes back broken without raising. Load it from a local folder")
        self.tokenizer, self.text_model = tokenizer, text_model

    def embed(self, prompts: str | Sequence[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_model.parameters()).device
        mask = tok.attention_mask.to(device) if getattr(self.text_model.config, "use_attention_mask", False) else None
        return self.text_model(tok.input_ids.to(device), attention_mask=mask)[0]      # (B, L, D)

    def forward(self, prompts: str | Sequence[str]) -> Cond:
        return Cond(text=self.embed(prompts), null_text=self.embed([""]))


class LatentCodec(nn.Module):
    """The VAE as latent codec: encode images in [-1, 1] (B, 3, H, W) to latents scaled by the VAE's scaling_factor
    (z = (mean - shift) * scale; a sample of the posterior when a generator is given), decode back (not clamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        dist = self.vae.encode(images).latent_dist
        z = dist.mean if generator is None else dist.sample(generator=generator)
        return (z - self.shift) * self.scale

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample


@dataclass
class SD:
    """A Stable Diffusion model in course pieces; `scheduler` is kept only for diffusers interop (saving students)."""

    model: SDDenoiser
    text: TextEncoder
    vae: LatentCodec
    scheduler: Any
    reference: dict           # the pipeline's {"source", "subfolder", "revision"}

    def config(self) -> dict:
        return {"pipeline": self.reference, "model": self.model.config()}


def from_pipeline(pipe: Any, reference: dict | None = None) -> SD:
    """Course pieces sharing the modules of a diffusers StableDiffusionPipeline (nothing is copied)."""
    sched = dict(pipe.scheduler.config)
    unet_ref = None if reference is None else {**reference, "subfolder": "unet"}
    model = SDDenoiser(pipe.unet, process_from_scheduler(sched), parameterization_from_scheduler(sched), unet_ref)
    return SD(model, TextEncoder(pipe.tokenizer, pipe.text_encoder), LatentCodec(pipe.vae), pipe.scheduler, reference)


def load_sd(source: str | os.PathLike, revision: str | None = None, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> SD:
    """Stable Diffusion from a diffusers pipeline folder or hub id (offline: a local folder), as course pieces.

    Text encoder and VAE are frozen (eval, no grad); the UNet is returned in eval mode with its parameters
    trainable (make a LoRA student with add_lora, or train it whole)."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, revision=revision, torch_dtype=dtype,
                                                       safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load a Stable Diffusion pipeline from {source!r} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}). Offline, pass a local diffusers folder (with "
                      "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from e
    sd = from_pipeline(pipe, _reference(source, None, revision))
    sd.text.text_model.to(device).eval().requires_grad_(False)
    sd.vae.vae.to(device).eval().requires_grad_(False)
    sd.model.to(device).eval()
    return sd


def save_sd_config(folder: str | os.PathLike, model: SDDenoiser, extra: dict | None = None) -> Path:
    """Write the course's config.json for `model`: the reference to its UNet, process, parameterization (no weights).
    A LoRA student also needs its adapter weights beside it: use save_lora, which calls this."""
    if model.reference is None:
        raise ValueError("this SDDenoiser has no reference to pretrained weights (build it with load_sd); a student "
                         "with new weights is saved with save_student")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps({"sd": model.config(), **(extra or {})}, indent=2, sort_keys=True))
    return folder


def load_sd_model(folder: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[SDDenoiser, dict]:
    """Rebuild an SDDenoiser from a course config.json (save_sd_config / save_lora / save_student): the UNet is
    loaded from its reference, then the LoRA adapter in `folder`, if any. Returns (model in eval mode, config)."""
    from diffusers import UNet2DConditionModel

    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} holds no course SD config (save_sd_config wrote none)")
    config = json.loads(path.read_text())
    c = config["sd"]
    ref = c["unet"]
    unet = UNet2DConditionModel.from_pretrained(ref["source"], subfolder=ref["subfolder"], revision=ref["revision"],
                                                torch_dtype=dtype)
    proc = dict(c["process"])
    name = proc.pop("name")
    model = SDDenoiser(unet, SDDiscrete(**proc) if name == SDDiscrete.name else make_process(name, **proc),
                       c["parameterization"], ref)
    if c.get("lora"):
        load_lora(model, folder)
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------------------------------------------
# Students: a LoRA adapter, or a whole UNet, saved in diffusers' formats
# ----------------------------------------------------------------------------------------------------------------

def add_lora(model: SDDenoiser, r: int = 4, alpha: float | None = None, target_modules: Sequence[str] = LORA_TARGETS,
             init: str | bool = "gaussian", seed: int = 0) -> SDDenoiser:
    """A LoRA student (Hu et al. 2022): freeze the UNet, add rank-r adapters to its attention projections.
    lora_B starts at zero, so the student starts as the teacher; only the adapter's parameters train.
    Initialised under config.seeded(seed) (the caller's global RNG is left as it was). Returns `model`."""
    from peft import LoraConfig

    if model.lora is not None:
        raise ValueError("this model already has a LoRA adapter")
    alpha = float(r if alpha is None else alpha)
    model.unet.requires_grad_(False)
    with seeded(seed):
        model.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init,
                                          target_modules=list(target_modules)))
    model.lora = {"r": r, "alpha": alpha, "target_modules": list(target_modules)}
    return model


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with the LoRA adapters of model's UNet switched off (model: an SDDenoiser, a student holding one
    as .denoiser, or a UNet): the teacher of a LoRA student is the same UNet without its adapter, so one UNet is in
    memory. Yields `model`."""
    unet = getattr(model, "denoiser", model)
    unet = getattr(unet, "unet", unet)
    unet.disable_adapters()
    try:
        yield model
    finally:
        unet.enable_adapters()


class AdapterOff(nn.Module):
    """The base model under a LoRA student, as a course model: model(x, t, cond) -> Pred runs the student's own UNet
    with its adapter switched off (adapter_disabled). The student is held, not registered: it stays owned (trained,
    checkpointed) by whoever owns it. The teacher of LCM-LoRA, of a LoRA reflow stage and DMD2's real score."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = (model,)

    @property
    def process(self):
        return self._model[0].process

    @property
    def parameterization(self) -> str:
        return self._model[0].parameterization

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Pred:
        with adapter_disabled(self._model[0]) as m:
            return m(x, t, cond)


def lora_state_dict(model_or_unet: nn.Module) -> dict[str, Tensor]:
    """The LoRA adapter's weights only, with diffusers' key names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = getattr(model_or_unet, "unet", model_or_unet)
    if not getattr(unet, "peft_config", None):
        raise ValueError("this UNet has no LoRA adapter: add one with sd.add_lora(model)")
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(model_or_unet: nn.Module, folder: str | os.PathLike) -> Path:
    """Save ONLY the LoRA adapter, in diffusers' format (folder/pytorch_lora_weights.safetensors, with the adapter's
    rank and alpha as metadata): `StableDiffusionPipeline.load_lora_weights(folder)` loads it onto the teacher.
    For an SDDenoiser with a reference, config.json records the teacher (load_sd_model rebuilds the student)."""
    from diffusers import StableDiffusionPipeline

    unet = getattr(model_or_unet, "unet", model_or_unet)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(unet).items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=weights, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    if isinstance(model_or_unet, SDDenoiser) and model_or_unet.reference is not None:
        save_sd_config(folder, model_or_unet)
    return folder


def load_lora(model: SDDenoiser, folder: str | os.PathLike) -> SDDenoiser:
    """Load a LoRA adapter saved by save_lora (or any diffusers SD LoRA) into `model`'s UNet."""
    model.unet.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix="unet", adapter_name="default")
    cfg = model.unet.peft_config["default"]
    model.lora = {"r": cfg.r, "alpha": float(cfg.lora_alpha), "target_modules": sorted(cfg.target_modules)}
    return model


def save_student(sd: SD, folder: str | os.PathLike, model: SDDenoiser | None = None, scheduler: Any = None) -> Path:
    """Save a full student (all UNet weights trained) as a diffusers pipeline folder with the teacher's text encoder,
    tokenizer and VAE (safetensors): `StableDiffusionPipeline.from_pretrained(folder)` and `load_sd(folder)` load it.

    model: the student (default sd.model); scheduler: the one to ship with it (default the teacher's; a consistency
    student ships e.g. LCMScheduler.from_config(sd.scheduler.config))."""
    from diffusers import StableDiffusionPipeline

    model = sd.model if model is None else model
    if model.lora is not None:
        raise ValueError("this student is a LoRA adapter on the teacher: save it with save_lora (or merge it first "
                         "with model.unet.fuse_lora(); model.unet.unload_lora() ...)")
    if scheduler is None and isinstance(model.process, RectifiedFlow) and not is_flow_scheduler(sd.scheduler.config):
        scheduler = flow_scheduler(sd.scheduler.config)           # a flow student ships with the flow scheduler
    pipe = StableDiffusionPipeline(unet=model.unet, vae=sd.vae.vae, text_encoder=sd.text.text_model,
                                   tokenizer=sd.text.tokenizer, scheduler=scheduler or sd.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    student = SDDenoiser(model.unet, model.process, model.parameterization, _reference(folder, "unet", None))
    save_sd_config(folder, student)
    return folder


def require_codec(sd: Any) -> None:
    """LCM distils in the latent space of the teacher's own VAE: refuse a teacher that comes without it."""
    if getattr(sd, "vae", None) is None or getattr(sd, "text", None) is None:
        raise ValueError("a latent teacher needs its autoencoder and text encoder: LCM distils in the teacher's own "
                         "latent space (images -> its VAE's scaled latents) with its own text embeddings. Pass the "
                         "whole model from sd.load_sd(folder) or minisd.load_mini_sd(), not the UNet alone")
    latent = sd.vae.vae.config.latent_channels
    if latent != sd.model.unet.config.in_channels:
        raise ValueError(f"the VAE makes {latent}-channel latents but the UNet takes "
                         f"{sd.model.unet.config.in_channels}: this autoencoder is not the teacher's own")


def base_fingerprint(unet: nn.Module) -> str:
    """A short hash of a base UNet: its public config and (a strided subset of) its non-LoRA weights, the base a LoRA
    was trained on."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in sorted(dict(unet.config).items()) if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                continue
            h.update(name.replace(".base_layer", "").encode())
            flat = p.detach().flatten()
            # the bytes of up to 4096 evenly strided entries: exact, and independent of the thread count (a float
            # sum is not: its rounding depends on how the threads split it)
            h.update(flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_unet_student(unet: nn.Module, folder: str | os.PathLike, meta_file: str, meta: dict) -> Path:
    """A full student of an SD teacher (LCM, TCD): its UNet in diffusers' format (folder/unet) and its settings as
    JSON (folder/meta_file)."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / meta_file).write_text(json.dumps(meta, indent=2))
    return folder


def load_unet_student(folder: str | os.PathLike, meta_file: str, teacher: nn.Module, what: str
                      ) -> tuple[nn.Module, dict]:
    """(the student's UNet as an sd.SDDenoiser with the teacher's process and parameterisation, its settings) from a
    folder written by save_unet_student; `what` names the student in the error when meta_file is missing."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    if not (folder / meta_file).is_file():
        raise FileNotFoundError(f"{folder / meta_file} is missing: {folder} holds no {what}")
    meta = json.loads((folder / meta_file).read_text())
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    return SDDenoiser(unet, teacher.process, teacher.parameterization), meta


def save_peft_lora(unet: nn.Module, folder: str | os.PathLike, adapter: str = "default") -> Path:
    """Save one LoRA adapter of `unet` in diffusers' file (folder/pytorch_lora_weights.safetensors, keys
    "unet.<module>.lora_A/B.weight", peft's names, which load_lora_weights reads). sd.save_lora converts the keys to
    diffusers' old names, which mixes two formats once the adapter also covers convolutions and feed-forwards."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    peft_weights = get_peft_model_state_dict(unet, adapter_name=adapter)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in peft_weights.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=weights, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict())
    return folder


# ----------------------------------------------------------------------------------------------------------------
# A tiny pipeline, built offline (tests and smoke runs)
# ----------------------------------------------------------------------------------------------------------------

def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (GPT-2's bytes_to_unicode): start/end tokens, 256 bytes, 256 word-final bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:              # unprintable bytes map to code points 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    return vocab


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", time_cond_proj_dim: int | None = None) -> Any:
    """A ~1.7 M-parameter StableDiffusionPipeline built offline from configs (diffusers' own test sizes): UNet (32, 64)
    with cross-attention on 32-d text, 8x8 latents (16x16 images), CLIP text model (vocab 514, 16 tokens) with a
    byte-level tokenizer, SD's scaled-linear schedule in a DDIMScheduler. Random weights initialised under
    config.seeded(seed): deterministic, and the caller's global RNG is left as it was."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim)
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            norm_num_groups=32)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=514, max_position_embeddings=16,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    tokenizer = CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=16)
    # SD 1.x's schedule (its scheduler_config), in a DDIMScheduler
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
