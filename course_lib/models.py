"""Backbones, and the adapter that turns any backbone into the course's model interface.

Every backbone has the signature `net(x, timestep, class_labels=None, ...) -> out` and knows nothing about the
noise process or the parameterization. `Denoiser(net, process, parameterization)` is the course model, called
one way for every model of the course (2D MLPs, the digits UNet, the mini Stable Diffusion and SD 1.5, whose
UNet is a backbone here through the adapter sd.SDUNet):

    model(x, t, cond=None) -> Pred(x0, eps)       x (B, ...), t (B,) in [0, 1], cond a conditioning.Cond or None

Class labels travel as conditioning.labels(y, num_classes) = Cond(y=y, null_y=num_classes). A guided student
(Meng et al. 2023, notebook 02) also reads the guidance weight w from cond.w: its backbone is built with
`guidance_range=(w_min, w_max)` and called `net(x, timestep, class_labels, guidance=w)`.
`with_guidance_input(teacher, w_range)` builds one from a teacher.

It feeds the backbone `process.timestep(t)` and converts its native output with `predictions.to_pred`.
Checkpoints store the backbone's constructor arguments under a registered architecture name (never a
class path), the process and the parameterization; `load_denoiser` rebuilds the model from them.
Preconditioned and wrapped models (`EDMPrecond`, `ConsistencyModel`) save and load with `save_model` / `load_model`,
which rebuild the whole stack from its config (`build_model`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .checkpoint import load_tensors, save_tensors, CheckpointError
from .conditioning import Cond, backbone_inputs, check
from .precond import KINDS as PRECOND_KINDS, Boundary, edm
from .predictions import Pred, to_pred
from .processes import AffineProcess, EDM, bcast, make_process, time_dtype


def timestep_embedding(timestep: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; DDPM) of timesteps in [0, 1000]: (B,) -> (B, dim), computed in
    float32 (float64 for float64 timesteps: a float64 model's finite differences in t stay accurate)."""
    half = dim // 2
    dtype = torch.float64 if timestep.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=dtype) / half)
    args = timestep.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ZeroEmbedding(nn.Module):
    """The embedding of one more scalar input, added to a backbone's time embedding: sinusoidal features of a value
    u in the time embedding's range [0, 1000] -> MLP -> (B, hidden). The last layer starts at zero, so a model
    copied from one without this input starts out as that model, whatever the input, and learns what it changes
    (a guided student's w, a flow map's step size)."""

    def __init__(self, hidden: int, emb_dim: int = 128):
        super().__init__()
        self.emb_dim = emb_dim
        self.mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, u: Tensor) -> Tensor:
        """u (B,) in [0, 1000] -> (B, hidden)."""
        return self.mlp(timestep_embedding(u, self.emb_dim).to(self.mlp[0].weight.dtype))


class GuidanceEmbedding(ZeroEmbedding):
    """Embedding of the guidance weight w (Meng et al. 2023, Sec. 3.1: a Fourier embedding of w added to the
    time embedding): a `ZeroEmbedding` of w mapped linearly from [w_min, w_max] to [0, 1000].

    The last layer starts at zero, so a student copied from a teacher starts as the conditional teacher (its output
    ignores w) and learns what w changes. A student is only trained on its range: calling it with w outside
    [w_min, w_max] is an error, never a silent extrapolation.
    """

    def __init__(self, hidden: int, w_range: tuple[float, float], emb_dim: int = 128):
        w_min, w_max = (float(v) for v in w_range)
        if not w_max > w_min:
            raise ValueError(f"guidance range must be (w_min, w_max) with w_min < w_max; got {tuple(w_range)}")
        super().__init__(hidden, emb_dim)
        self.w_min, self.w_max = w_min, w_max

    def check(self, w: Tensor) -> None:
        tol = 1e-6 * max(1.0, self.w_max - self.w_min)
        bad = w[(w < self.w_min - tol) | (w > self.w_max + tol)]
        if bad.numel():
            raise ValueError(f"this student was distilled for guidance weights in [{self.w_min:g}, {self.w_max:g}]; "
                             f"got {float(bad[0]):g}. Distill a student for a wider range (w_range=...) instead.")

    def forward(self, w: Tensor) -> Tensor:
        """w (B,) -> (B, hidden)."""
        self.check(w)
        return super().forward(1000.0 * (w.float() - self.w_min) / (self.w_max - self.w_min))   # (B,) in [0, 1000]


class StepEmbedding(ZeroEmbedding):
    """A flow map's step-size embedding: the `ZeroEmbedding` of d = timestep(t) - timestep(s) >= 0, the step of
    X(x_t, t -> s) in the backbone's time units (1000 (t - s) for the course's processes): MeanFlow's (t, t - r)
    conditioning (Geng et al. 2025, Table 1c) and the shortcut models' step size d (Frans et al. 2024). A flow-map
    student copied from its teacher is, for every s, the teacher's instantaneous prediction (exact at s = t)."""

    def forward(self, d: Tensor) -> Tensor:
        """d (B,) -> (B, hidden). A flow map runs back in time (s <= t): d < 0 is an error."""
        bad = d[d < -1e-3]
        if bad.numel():
            raise ValueError(f"a flow map X(x_t, t -> s) steps from t to an earlier time s <= t; got a step of "
                             f"{float(bad[0]):g} (in the backbone's time units, timestep(t) - timestep(s))")
        return super().forward(d)


def _no_guidance(guidance: Tensor | None, name: str) -> None:
    if guidance is not None:
        raise ValueError(f"this {name} has no guidance input (it was built without guidance_range); build a guided "
                         "student with models.with_guidance_input(teacher, w_range)")


def _need_guidance(guidance: Tensor | None, emb: GuidanceEmbedding, n: int, device) -> Tensor:
    if guidance is None:
        raise ValueError(f"this student takes a guidance weight w in [{emb.w_min:g}, {emb.w_max:g}]: "
                         "call model(x, t, cond) with cond.w set (Cond(y=..., null_y=..., w=w))")
    return torch.as_tensor(guidance, device=device).float().reshape(-1).expand(n)


NOT_A_FLOW_MAP = ("this model is not a flow map (its backbone was built without flow_map=True), so it takes no end "
                  "time s (Cond.s): sample it with a sampler of samplers, or build a flow-map student with "
                  "models.flow_map_student(teacher) (remove s from a teacher's cond with with_end_time(cond, None))")


def _step_size(timestep: Tensor, end_time: Tensor | None, flow_map: bool, name: str) -> Tensor | None:
    """d = timestep - end_time (B,) for a flow-map backbone; None for a plain one. Either mismatch is an error."""
    if not flow_map:
        if end_time is not None:
            raise ValueError(f"{name}: {NOT_A_FLOW_MAP}")
        return None
    if end_time is None:
        raise ValueError(f"this flow-map {name} needs the end time s of X(x_t, t -> s): call model(x, t, cond) with "
                         "cond.s set (conditioning.with_end_time(cond, s)), or sample it with samplers.flow_map")
    return timestep - end_time.reshape(-1).expand(len(timestep))


class MLP2D(nn.Module):
    """Time-conditioned MLP for low-dimensional data: `depth` hidden layers of width `hidden`, SiLU.

    The time embedding (plus a class embedding when num_classes is set, with index num_classes reserved for
    the null label of classifier-free guidance, plus a `GuidanceEmbedding` of w when guidance_range is set, plus a
    `StepEmbedding` of timestep - end_time when flow_map is set) is added to every hidden layer's pre-activation.
    time_scale multiplies the time inputs before their embedding: 1 embeds the course's timestep 1000 t; a JVP in t
    (sCM, MeanFlow) is better behaved at a small scale (0.01: 10 t; Lu & Song 2024, Sec. 4.1, c_noise(t) = t).
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_classes: int | None = None,
                 emb_dim: int = 128, guidance_range: tuple[float, float] | None = None, flow_map: bool = False,
                 time_scale: float = 1.0):
        super().__init__()
        self.dim, self.hidden, self.depth, self.num_classes, self.emb_dim = dim, hidden, depth, num_classes, emb_dim
        self.guidance_range = None if guidance_range is None else tuple(float(v) for v in guidance_range)
        self.flow_map, self.time_scale = bool(flow_map), float(time_scale)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.guidance_emb = GuidanceEmbedding(hidden, guidance_range, emb_dim) if guidance_range else None
        self.step_emb = StepEmbedding(hidden, emb_dim) if flow_map else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def config(self) -> dict:
        cfg = {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "num_classes": self.num_classes,
               "emb_dim": self.emb_dim}
        if self.guidance_range is not None:
            cfg["guidance_range"] = list(self.guidance_range)
        if self.flow_map:
            cfg["flow_map"] = True
        if self.time_scale != 1.0:
            cfg["time_scale"] = self.time_scale
        return cfg

    def embed(self, timestep: Tensor, class_labels: Tensor | None, guidance: Tensor | None = None,
              end_time: Tensor | None = None) -> Tensor:
        if self.time_scale != 1.0:
            timestep = self.time_scale * timestep
            end_time = None if end_time is None else self.time_scale * end_time
        e = self.time_mlp(timestep_embedding(timestep, self.emb_dim).to(self.inp.weight.dtype))
        if self.class_emb is not None:
            if class_labels is None:  # unconditional call of a conditional net: use the null label
                class_labels = torch.full((len(timestep),), self.num_classes, device=timestep.device)
            e = e + self.class_emb(class_labels)
        if self.guidance_emb is None:
            _no_guidance(guidance, "MLP2D")
        else:
            e = e + self.guidance_emb(_need_guidance(guidance, self.guidance_emb, len(timestep), timestep.device))
        d = _step_size(timestep, end_time, self.flow_map, "MLP2D")
        if d is not None:
            e = e + self.step_emb(d)
        return torch.nn.functional.silu(e)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None, end_time: Tensor | None = None) -> Tensor:
        """end_time: a flow map's end time s in the same units as timestep (Denoiser maps both)."""
        e = self.embed(timestep, class_labels, guidance, end_time)                # (B, hidden)
        h = torch.nn.functional.silu(self.inp(x) + self.emb_proj[0](e))          # (B, hidden)
        for layer, proj in zip(self.layers, self.emb_proj[1:]):
            h = torch.nn.functional.silu(layer(h) + proj(e))
        return self.out(h)                                                         # (B, dim)


class PackedEmbedding(nn.Module):
    """The UNet's embeddings beyond time, in diffusers' class-embedding slot. UNet2DModel computes emb =
    time_embedding(t) + class_embedding(class_labels) and hands class_labels over untouched, so the course's UNet
    packs its extra inputs into one float tensor (B, k), in this order: [y] a label (num_classes set), [w] a guided
    student's weight (a `GuidanceEmbedding`), [d] a flow map's step timestep(t) - timestep(s) (a `StepEmbedding`);
    this module returns the sum of their embeddings. Its keys are nn.Embedding's `weight` (so a teacher's class
    embedding loads into it) and `guidance.*`, `step.*`."""

    def __init__(self, num_embeddings: int | None, dim: int, w_range: tuple[float, float] | None = None,
                 flow_map: bool = False):
        super().__init__()
        self.weight = nn.Parameter(nn.init.normal_(torch.empty(num_embeddings, dim))) if num_embeddings else None
        self.guidance = GuidanceEmbedding(dim, w_range) if w_range is not None else None
        self.step = StepEmbedding(dim) if flow_map else None

    def forward(self, packed: Tensor) -> Tensor:
        k = sum(m is not None for m in (self.weight, self.guidance, self.step))
        if packed.ndim != 2 or packed.shape[1] != k:
            raise ValueError(f"this UNet's class embedding takes packed (B, {k}) [label, w, step] (those it has); "
                             "call the course's UNet with class_labels, guidance=w, end_time=s")
        cols = list(packed.unbind(1))
        e = 0
        if self.weight is not None:
            e = e + torch.nn.functional.embedding(cols.pop(0).round().long(), self.weight)
        if self.guidance is not None:
            e = e + self.guidance(cols.pop(0))
        if self.step is not None:
            e = e + self.step(cols.pop(0))
        return e


class UNet(nn.Module):
    """diffusers' UNet2DModel behind the course's backbone signature (it returns a tensor, not an output object).

    Class-conditional when num_classes is set; index num_classes is the null label for guidance. With
    guidance_range (needs num_classes) the net takes `guidance=w` (B,): a guided student (Meng et al. 2023). With
    flow_map it takes `end_time` (B,) and embeds the step timestep - end_time: a flow map. Both ride a
    `PackedEmbedding` in place of the class embedding. time_scale multiplies the time inputs (see MLP2D).
    """

    def __init__(self, sample_size: int = 16, in_channels: int = 1, block_out_channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, num_classes: int | None = None, attention: bool = False,
                 norm_num_groups: int = 8, guidance_range: tuple[float, float] | None = None, flow_map: bool = False,
                 time_scale: float = 1.0):
        super().__init__()
        from diffusers import UNet2DModel

        self.kwargs = dict(sample_size=sample_size, in_channels=in_channels, block_out_channels=list(block_out_channels),
                           layers_per_block=layers_per_block, num_classes=num_classes, attention=attention,
                           norm_num_groups=norm_num_groups)
        if guidance_range is not None:
            if not num_classes:
                raise ValueError("a guided UNet needs num_classes (guidance mixes conditional and unconditional)")
            self.kwargs["guidance_range"] = [float(v) for v in guidance_range]
        if flow_map:
            self.kwargs["flow_map"] = True
        if float(time_scale) != 1.0:
            self.kwargs["time_scale"] = float(time_scale)
        self.time_scale = float(time_scale)
        n = len(block_out_channels)
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if attention:  # attention at the lowest resolution only
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=norm_num_groups,
            num_class_embeds=(num_classes + 1) if num_classes else None,
        )
        self.guided, self.flow_map = guidance_range is not None, bool(flow_map)
        if self.guided or self.flow_map:
            dim = self.unet.time_embedding.linear_2.out_features
            self.unet.class_embedding = PackedEmbedding((num_classes + 1) if num_classes else None, dim,
                                                        guidance_range, self.flow_map)

    def config(self) -> dict:
        return dict(self.kwargs)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None, end_time: Tensor | None = None) -> Tensor:
        if self.num_classes and class_labels is None:
            class_labels = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long)
        if self.time_scale != 1.0:
            timestep = self.time_scale * timestep
            end_time = None if end_time is None else self.time_scale * end_time
        d = _step_size(timestep.reshape(-1).expand(len(x)), end_time, self.flow_map, "UNet")
        if self.guided:
            w = _need_guidance(guidance, self.unet.class_embedding.guidance, len(x), x.device)
        else:
            _no_guidance(guidance, "UNet")
        if self.guided or self.flow_map:                                           # (B, k): [y][, w][, d]
            cols = ([class_labels.float()] if self.num_classes else []) + ([w] if self.guided else []) + \
                   ([d.float()] if self.flow_map else [])
            class_labels = torch.stack(cols, dim=1)
        return self.unet(x, timestep, class_labels=class_labels).sample


class DiffusersUNet(nn.Module):
    """Adapter for any diffusers UNet2DModel built elsewhere (e.g. google/ddpm-cifar10-32): returns `.sample`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.unet(x, timestep, class_labels=class_labels).sample


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp2d": MLP2D, "unet": UNet}


def build_net(arch: str, **kwargs: Any) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; valid ones: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


class Denoiser(nn.Module):
    """The course's model interface around a backbone: model(x, t, cond=None) -> Pred(x0, eps).

    cond is a conditioning.Cond or None: its labels, guidance weight w (a guided student), text, timestep_cond and
    end time s (a flow map, `flow_map_student`) reach the backbone (`backbone_inputs`); a bare label tensor is a
    TypeError (wrap it: conditioning.labels)."""

    synced_methods = ("raw",)  # training losses call raw, not forward: the engine runs it through DDP / FSDP

    def __init__(self, net: nn.Module, process: AffineProcess, parameterization: str):
        super().__init__()
        if parameterization == "edm" and not isinstance(self, EDMPrecond):
            raise ValueError("the 'edm' parameterization also scales the input: build models.EDMPrecond(net, process)")
        self.net, self.process, self.parameterization = net, process, parameterization

    def raw(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The backbone's native output (what a training loss in this parameterization compares): the backbone is
        called net(x, process.timestep(t), **backbone_inputs(cond)) (class_labels, guidance = cond.w,
        encoder_hidden_states = cond.text, timestep_cond, end_time = process.timestep(cond.s) for a flow map), only
        with the fields cond holds."""
        kwargs = {} if check(cond) is None else backbone_inputs(cond)
        if "guidance" in kwargs:                                                   # (B,) float32
            kwargs["guidance"] = kwargs["guidance"].to(dtype=torch.float32, device=x.device).reshape(-1).expand(len(x))
        timestep = self.process.timestep(t.to(time_dtype(t.dtype))).to(time_dtype(x.dtype))   # float32+, as x may be bf16
        if "end_time" in kwargs:                                                   # a flow map's s, in t's units
            if not getattr(self.net, "flow_map", False):
                raise ValueError(NOT_A_FLOW_MAP)
            s = kwargs["end_time"].to(device=x.device).reshape(-1).expand(len(x))
            kwargs["end_time"] = self.process.timestep(s.to(time_dtype(s.dtype))).to(time_dtype(x.dtype))
        return self.net(x, timestep, **kwargs)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Pred:
        return to_pred(self.raw(x, t, cond), x, t.to(time_dtype(x.dtype)), self.process, self.parameterization)

    def config(self) -> dict:
        arch = next((k for k, v in ARCHITECTURES.items() if isinstance(self.net, v)), None)
        if arch is None or not hasattr(self.net, "config"):
            raise ValueError(f"cannot save a Denoiser around {type(self.net).__name__}: register it in ARCHITECTURES")
        return {"arch": arch, "net": self.net.config(), "process": self.process.config(),
                "parameterization": self.parameterization}


class EDMPrecond(Denoiser):
    """EDM's preconditioned denoiser around a backbone F (Karras et al. 2022, Eq. 7 and Table 1), edm process only:

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),  c_in = 1 / sqrt(sigma^2 + sd^2),
        c_noise = log(sigma) / 4                                              (sd = the process's sigma_data)

    and returns Pred(x0 = D, eps = (x - D) / sigma). It is a Denoiser with parameterization "edm": `raw` returns F,
    whose training target `from_pred(..., "edm")` is (x0 - c_skip x) / c_out, so the course's denoising loss
    ||F - target||^2 equals (1 / c_out^2) ||D - x0||^2, EDM's loss weighting lambda(sigma) = (sigma^2 + sd^2) /
    (sigma sd)^2 (Eq. 8; the noise levels are drawn from the course's t ~ U, not EDM's log-normal p(sigma)).
    The config is a Denoiser config with parameterization "edm"; `build_denoiser` rebuilds this class from it.
    """

    def __init__(self, net: nn.Module, process: AffineProcess, parameterization: str = "edm"):
        if not isinstance(process, EDM) or parameterization != "edm":
            raise ValueError(f"EDMPrecond needs the edm process and parameterization 'edm'; got {process!r}, "
                             f"{parameterization!r}")
        super().__init__(net, process, "edm")

    def raw(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """F(c_in x; c_noise), the backbone's output (c_noise is the edm process's `timestep`)."""
        c_in = edm(self.process.sigma(t.to(time_dtype(x.dtype))), self.process.sigma_data)[2]
        return super().raw((bcast(c_in, x) * x).to(x.dtype), t, cond)


def build_denoiser(config: dict) -> Denoiser:
    """Rebuild a Denoiser (random weights) from `Denoiser.config()` (an EDMPrecond for parameterization "edm")."""
    proc = dict(config["process"])
    cls = EDMPrecond if config["parameterization"] == "edm" else Denoiser
    return cls(build_net(config["arch"], **config["net"]), make_process(proc.pop("name"), **proc),
               config["parameterization"])


class ConsistencyModel(Boundary):
    """The consistency parameterisation (Song et al. 2023, Eq. 3 and Appendix C) around any course model: the
    `precond.Boundary` wrapper with the "consistency" scalings, on the paper's variance-exploding variables
    (s = sigma_t / alpha_t, x_ve = x / alpha_t, F the EDM network output that the wrapped model's x0_hat carries):

        f(x, t) = alpha(t_min) (c_skip(s) x_ve + c_out(s) F)
        c_skip  = sd^2 / ((s - s_min)^2 + sd^2),   c_out = sd (s - s_min) / sqrt(sd^2 + s^2),   s_min = s(t_min)

    At t = t_min, c_skip = 1 and c_out = 0 exactly, so f(x, t_min) = x bitwise: the boundary condition holds by
    construction, not by training. Away from t_min f is the wrapped model's x0_hat up to O(s_min / s): a student
    initialised from its teacher starts as the teacher's denoiser. (The factor alpha(t_min), 1 - 5e-6 for vp-cosine,
    puts the paper's end point x_ve(t_min) back at the course's x_{t_min}.)
    Returns Pred(x0 = f, eps = (x - alpha f) / sigma), consistent with x_t = alpha x0 + sigma eps. The conditioning
    (a Cond: labels, a guidance weight w, text) goes to the wrapped model unchanged. With the edm process and sigma_data
    0.5 this is the paper's f; Song et al. use sigma_min = 0.002, i.e. t_min = 0.002 / sigma_max.
    """

    def __init__(self, model: nn.Module, t_min: float, sigma_data: float = 0.5):
        super().__init__(model, "consistency", t_min=t_min, sigma_data=sigma_data)

    @property
    def t_min(self) -> float:
        return self.params["t_min"]

    @property
    def sigma_data(self) -> float:
        return self.params["sigma_data"]


def build_model(config: dict) -> nn.Module:
    """Rebuild any course model stack (random weights) from its `config()`: a Denoiser (an EDMPrecond for
    parameterization "edm"), or a ConsistencyModel (or another precond.Boundary) around any of them."""
    kind = config.get("kind", "denoiser")
    if kind == "consistency":
        return ConsistencyModel(build_model(config["model"]), config["t_min"], config["sigma_data"])
    if kind in PRECOND_KINDS:                   # another named boundary condition (precond.KINDS), e.g. "gdd"
        params = {k: v for k, v in config.items() if k not in ("kind", "model")}
        return Boundary(build_model(config["model"]), kind, **params)
    if kind == "denoiser":
        return build_denoiser(config)
    raise ValueError(f"unknown model kind {kind!r} in the config; valid: denoiser, {', '.join(PRECOND_KINDS)}")


def null_label(model: nn.Module) -> int:
    """The null condition of a class-conditional course model: its backbone's num_classes K (labels 0..K-1 are the
    classes, K is "no label", the unconditional input of classifier-free guidance and of label dropout; the null_y
    of conditioning.labels(y, K)). Found through wrappers that hold the model as .model (a consistency Boundary, a
    guided wrapper). ValueError for a model that is not class-conditional."""
    inner = model
    while not hasattr(inner, "net") and hasattr(inner, "model"):
        inner = inner.model
    n = getattr(getattr(inner, "net", None), "num_classes", None)
    if not n:
        raise ValueError(f"{type(model).__name__} is not class-conditional (its backbone has no num_classes): "
                         "classifier-free guidance and label dropout need a model trained with a null label")
    return int(n)


def guidance_range(model: Denoiser) -> tuple[float, float] | None:
    """(w_min, w_max) a guided student was distilled for; None for a model without a guidance input."""
    r = model.config()["net"].get("guidance_range")
    return None if r is None else (float(r[0]), float(r[1]))


def with_guidance_input(teacher: Denoiser, w_range: tuple[float, float]) -> Denoiser:
    """A guided student (Meng et al. 2023, Sec. 3.1): the teacher's architecture plus a `GuidanceEmbedding` of w
    for w in w_range, with every teacher weight copied. The embedding's last layer is zero, so at first the
    student is exactly the conditional teacher, whatever w. Same device as the teacher, float32, train mode."""
    config = teacher.config()
    if config["net"].get("guidance_range") is not None:
        raise ValueError("this model already takes a guidance weight (guidance_range is set)")
    if not config["net"].get("num_classes"):
        raise ValueError("guided distillation needs a class-conditional teacher (num_classes set, trained with "
                         "label dropout) so that classifier-free guidance exists")
    return _copy_with(teacher, {"guidance_range": [float(v) for v in w_range]}, "guidance", "guided")


def _copy_with(teacher: Denoiser, option: dict, new_keys: str, what: str) -> Denoiser:
    """The teacher's architecture with `option` added to its backbone's config and every teacher weight copied:
    only the new embedding's parameters (keys containing `new_keys`) keep their initialisation. Same device as
    the teacher, float32, train mode."""
    config = teacher.config()
    config["net"] = {**config["net"], **option}
    student = build_denoiser(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if new_keys not in k]
    if new or unexpected:
        raise RuntimeError(f"copying the teacher into the {what} student left keys unmatched: missing {new}, "
                           f"unexpected {unexpected}")
    device = next(teacher.parameters()).device
    return student.to(device).train().requires_grad_(True)


def is_flow_map(model: nn.Module) -> bool:
    """Whether a course model is a flow map (its backbone built with flow_map=True: it reads the end time cond.s);
    found through wrappers that hold the model as .model."""
    inner = model
    while not hasattr(inner, "net") and hasattr(inner, "model"):
        inner = inner.model
    return bool(getattr(getattr(inner, "net", None), "flow_map", False))


def flow_map_student(teacher: Denoiser) -> Denoiser:
    """A flow-map student X(x_t, t -> s) (MeanFlow, shortcut models): the teacher's architecture with flow_map=True
    (a `StepEmbedding` of the step t - s, read from cond.s) and every teacher weight copied. The embedding's last
    layer is zero, so at first the student returns the teacher's prediction for every s: its DDIM jump t -> s is
    the teacher's DDIM step, exact as s -> t. Same device as the teacher, float32, train mode."""
    config = teacher.config()
    if config["net"].get("flow_map"):
        raise ValueError("this model is already a flow map (flow_map is set)")
    return _copy_with(teacher, {"flow_map": True}, "step", "flow-map")


def save_model(folder: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> None:
    """Save any course model stack (Denoiser, EDMPrecond, ConsistencyModel): weights as safetensors, its config
    under "model" in config.json (plus `extra`); `load_model` rebuilds it."""
    save_tensors(folder, model.state_dict(), {"model": model.config(), **(extra or {})})


def load_model(folder: str | os.PathLike, how_to_recreate: str = "", device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict]:
    """Load a model saved by `save_model` (or `save_denoiser`); returns (model in eval mode, the whole config)."""
    tensors, config = load_tensors(folder, how_to_recreate)
    key = "model" if "model" in config else "denoiser"
    if key not in config:
        raise CheckpointError(f"{folder}/config.json does not describe a model (no 'model' or 'denoiser' key).")
    try:
        model = build_model(config[key])
        model.load_state_dict(tensors)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"weights in {folder} do not match the model its config.json describes: {e}") from e
    return model.to(device).eval(), config


def save_denoiser(folder: str | os.PathLike, model: Denoiser, extra: dict | None = None, half: bool = False) -> None:
    """Weights as safetensors (half: floating-point tensors in fp16, the shipped models' form), the config under
    "denoiser" in config.json (plus `extra`); `load_denoiser` rebuilds it."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_tensors(folder, state, {"denoiser": model.config(), **(extra or {})})


def load_denoiser(folder: str | os.PathLike, how_to_recreate: str = "", device: str | torch.device = "cpu"
                  ) -> tuple[Denoiser, dict]:
    """Load a Denoiser saved by `save_denoiser`; returns (model in eval mode, the whole config)."""
    tensors, config = load_tensors(folder, how_to_recreate)
    if "denoiser" not in config:
        raise CheckpointError(f"{folder}/config.json does not describe a denoiser (no 'denoiser' key).")
    model = build_denoiser(config["denoiser"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {folder} do not match the model its config.json describes: {e}") from e
    return model.to(device).eval(), config
