"""The course's 2D runs of Hyper-SD (distill.hypersd; notebook 11, bench hypersd): budgets by COURSE_MODE, the known
rewards of the 2D data, and the training of every ablation from one shipped teacher:

    "tscd"            TSCD's stages 8 -> 4 -> 2 -> 1 (updates per stage from the budget)
    "tscd-reward"     + reward feedback (ReFL) on the TSCD student
    "hypersd"         + score distillation (DMD's gradient, the 2D DMD2 recipe of bench dmd2) on the one-step end
    "cd-same-budget"  k = 1 from the start: consistency distillation (the DDIM-jump consistency function) with as
                      many teacher evaluations as TSCD's four stages (the same teacher step, batch, 4x the updates)

and the mini Stable Diffusion's unified LoRA (the shipped data/hypersd; notebook 11, section 7):

    train_minisd(sd, SD_RECIPE)     TSCD 8 -> 4 -> 2 -> 1 on SD's DDIM grid (sd_grid), then ReFL with data/reward's
                                    model; one LoRA on sd.model, resumable stage by stage (ckpt/k8 ... k1, reward)
    save_minisd / load_minisd       diffusers' LoRA file + hypersd.json (fixed w, base fingerprint, sampler)
    load_shipped_minisd(sd, name)   the shipped "tscd" / "tscd-reward" LoRA as a tcd.TCDModel
    evaluate_minisd(sd, student, n, steps)   recipes.lcm.evaluate with TCD's sampler (tcd.sss, SD_GAMMAS)

    python -m course_lib.recipes.hypersd train-minisd --out data/hypersd --threads 1
    python -m course_lib.recipes.hypersd evaluate-minisd      # docs/results/hypersd_minisd.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import minisd, paths
from ..config import pick
from ..data2d import batches, get_mixture, sample_2d
from ..distill import hypersd as h
from ..distill import tcd
from ..distill.dmd import DMDConfig
from ..distill.lcm import LORA_W, ORIGINAL_STEPS, present_targets
from ..distill.lcm import sample as lcm_sample
from ..distill.tcd import TCDModel
from ..grids import ddim_timesteps
from ..guidance import cfg as guided
from ..minisd import digit_batches
from ..reward import PromptReader, load_reward_model, reward, sd_reward_fn
from ..sd import (LORA_WEIGHTS, AdapterOff, adapter_disabled, add_lora, base_fingerprint, load_lora, require_codec,
                  save_peft_lora)
from ..train import TRAINER_WEIGHTS, Network, TrainConfig, train_networks
from . import lcm as lcm_recipes

PREFERRED = (0, 1, 2)   # gmm: the reward prefers components 0, 1, 2 (angles 0, 45, 90 degrees) of its eight


def budget(mode: str) -> dict:
    """The 2D budgets of bench hypersd (and notebook 11): updates per TSCD stage, batch, grid, rates, the reward and
    score stages."""
    return dict(
        stage_steps=pick(mode, smoke=5, laptop=150, full=1500), batch=pick(mode, smoke=128, laptop=512, full=2048),
        N=17, lr=1e-3, mu=0.9, ema=0.95, solver="ddim",
        reward_steps=pick(mode, smoke=5, laptop=150, full=1000), reward_lr=1e-4, lambda_reward=0.1,
        score_iters=pick(mode, smoke=10, laptop=400, full=4000), score_batch=pick(mode, smoke=64, laptop=256, full=1024),
        score_lr=1e-4)


def reward_fn(dataset: str) -> Callable:
    """The known reward of a 2D dataset: gmm, the log posterior of the PREFERRED components (hypersd.mode_reward,
    bumps of std 1); otherwise the right half plane (hypersd.half_plane_reward)."""
    if dataset == "gmm":
        return h.mode_reward(get_mixture("gmm").means, PREFERRED, scale=1.0)
    return h.half_plane_reward()


def tscd_config(b: dict, segments: tuple[int, ...] = h.SEGMENTS) -> h.TSCDConfig:
    return h.TSCDConfig(segments=segments, N=b["N"], solver=b["solver"], mu=b["mu"], lr=b["lr"], ema_decay=b["ema"])


def score_config(b: dict) -> DMDConfig:
    """bench dmd2's 2D recipe (batch normaliser, one t per batch, cosine rates, TTUR 5, GAN head) at the score
    stage's rate: the generator starts from a trained student, not from the teacher."""
    return DMDConfig(lr_g=b["score_lr"], lr_critic=b["score_lr"], normalize="batch", ttur=5, gan=True,
                     lr_schedule="cosine", t_shared=True)


def train_2d(teacher: nn.Module, dataset: str, b: dict, seed: int, progress: bool = False,
             ckpt_dir=None) -> dict[str, tuple[nn.Module, float, int]]:
    """Every ablation of one teacher: {model name: (student, training seconds, teacher-evaluation updates)}; the
    seconds of "tscd-reward" and "hypersd" include the stages before them."""
    data = batches(dataset)
    run = TrainConfig(steps=b["stage_steps"], batch_size=b["batch"], seed=seed, desc=f"Hyper-SD {dataset}")
    example = {"x": sample_2d(dataset, 8, torch.Generator().manual_seed(0))[0].to(next(teacher.parameters()).device)}
    sub = (lambda name: None) if ckpt_dir is None else (lambda name: f"{ckpt_dir}/{dataset}-{seed}/{name}")
    out: dict[str, tuple[nn.Module, float, int]] = {}
    n_stages = len(h.SEGMENTS)
    t0 = time.perf_counter()
    tscd, _ = h.distill_tscd(teacher, data, tscd_config(b), run=run, ckpt_dir=sub("tscd"), progress=progress)
    out["tscd"] = (tscd, time.perf_counter() - t0, b["stage_steps"] * n_stages)
    rcfg = h.RewardConfig(lambda_reward=b["lambda_reward"], lr=b["reward_lr"], N=b["N"], mu=b["mu"],
                          ema_decay=b["ema"], solver=b["solver"])
    rewarded, _ = h.distill_reward(tscd, data, reward_fn(dataset), rcfg,
                                   run=replace(run, steps=b["reward_steps"], desc=f"{run.desc} reward"),
                                   ckpt_dir=sub("reward"), progress=progress)
    out["tscd-reward"] = (rewarded, time.perf_counter() - t0, out["tscd"][2] + b["reward_steps"])
    final, _ = h.distill_score(rewarded, teacher, data, score_config(b),
                               run=replace(run, steps=b["score_iters"], batch_size=b["score_batch"],
                                           desc=f"{run.desc} score"), example=example, ckpt_dir=sub("score"),
                               progress=progress)
    out["hypersd"] = (final, time.perf_counter() - t0, out["tscd-reward"][2] + b["score_iters"])
    t1 = time.perf_counter()
    cd, _ = h.distill_tscd(teacher, data, tscd_config(b, (1,)),
                           run=replace(run, steps=b["stage_steps"] * n_stages, desc=f"CD same budget {dataset}"),
                           ckpt_dir=sub("cd"), progress=progress)
    out["cd-same-budget"] = (cd, time.perf_counter() - t1, b["stage_steps"] * n_stages)
    return out


def describe(b: dict) -> dict[str, Any]:
    return {**b, "segments": list(h.SEGMENTS), "gammas": {str(k): v for k, v in h.GAMMAS.items()},
            "preferred_gmm_components": list(PREFERRED)}


# ----------------------------------------------------------------------------------------------------------------
# The mini Stable Diffusion: ONE unified Hyper-SD LoRA (TSCD 8 -> 4 -> 2 -> 1 on SD's DDIM grid, then ReFL)
# ----------------------------------------------------------------------------------------------------------------
#
# The method functions are distill.hypersd's (tscd_step, reward_step); what changes on the mini SD, each as in the
# course's LCM-LoRA (distill.lcm.distill_lcm_lora):
#   grid      SD's discrete DDIM grid {0, 19, 39, ..., 999} (LCM's ddim_timesteps with skipping step 20, plus
#             timestep 0) in course time t = (tau + 1) / T; the segments' edges are grid points
#             (hypersd.segment_edges(k, grid=grid)), so the teacher's step never crosses an edge
#   student   a rank-r LoRA on the mini SD's UNet (LCM-LoRA's target modules) read as a TCF student at one fixed w
#             (tcd.TCDModel: x0_hat of the UNet, no boundary scalings; TSCD's DDIM-jump consistency function)
#   teacher   the SAME UNet with its adapter switched off (sd.AdapterOff), guided at the fixed w:
#             (1 + w) x0(c) - w x0(null): one UNet in memory. Every stage is taught by the original guided teacher
#             (TSCDConfig.chain_teacher = False: a stage's predecessor lives only in the adapter being trained) and
#             starts from the previous stage's adapter
#   target    theta^- is the online LoRA without gradients (diffusers' LoRA scripts; recipes.lcm.LORA_RECIPE)
#   reward    data/reward's model (reward.sd_reward_fn: VAE decoder with gradients, log r), NOT the judge
# Each stage is an engine run in ckpt/k8, k4, k2, k1 (then ckpt/reward): rerunning the same command resumes the
# interrupted stage; a finished stage reloads its adapter from its checkpoint.

@dataclass
class MiniSDRecipe:
    """The mini SD's Hyper-SD LoRA (a few hundred updates on one CPU thread)."""
    stage_steps: int = 100          # updates per TSCD stage (four stages)
    batch: int = 32
    stage_lr: tuple[float, ...] = (1e-3, 1e-3, 1e-3, 2e-4)   # per stage k = 8, 4, 2, 1: the LCM-LoRA's rate
                                    # (recipes.lcm.LORA_RECIPE), lowered for the last stage: with the online target
                                    # at 1e-3 the k = 1 stage made every step count worse than the k = 2 stage it
                                    # started from (data/hypersd/README.md)
    grad_clip: float = 1.0
    rank: int = 8
    w: float = LORA_W               # the fixed guidance weight (course w; guidance_scale 1 + w)
    distance: str = "huber"         # LCM's (c = 0.001)
    original_steps: int = ORIGINAL_STEPS
    reward_steps: int = 80          # updates of the reward stage (0: none)
    reward_lr: float = 2e-4
    lambda_reward: float = 0.02     # weight of -log r against the k = 1 TSCD term (weight 1)
    reward_t: tuple[float, float] = (0.05, 0.3)   # the late course times of ReFL's one-step prediction
    seed: int = 0


SD_RECIPE = MiniSDRecipe()
SD_SHIPPED = {"tscd": "mini-sd-hypersd-tscd", "tscd-reward": "mini-sd-hypersd-tscd-reward"}
HYPERSD_JSON = "hypersd.json"
SD_RECREATE = "python -m course_lib.recipes.hypersd train-minisd --out data/hypersd --threads 1"


def sd_grid(process: Any, original_steps: int = ORIGINAL_STEPS) -> torch.Tensor:
    """SD's DDIM grid with its end: timesteps 0, k - 1, 2k - 1, ..., T - 1 (k = T // original_steps) as increasing
    course times t = (tau + 1) / T (float64 (original_steps + 1,)): tscd_step's grid."""
    taus = torch.cat([torch.zeros(1, dtype=torch.int64), ddim_timesteps(original_steps, process.T)])
    return process.t_of_timestep(taus).to(torch.float64)


class _Held(nn.Module):
    """A view of a model for a step function, held (not registered, so the engine neither saves nor freezes it):
    adapter switched off (sd.AdapterOff) and guided at w (the teacher), or the online LoRA itself (the target)."""

    def __init__(self, model: nn.Module, w: float | None = None, adapter_off: bool = False):
        super().__init__()
        self._model = (AdapterOff(model) if adapter_off else model,)
        self.w, self.adapter_off = w, adapter_off
        self.process = model.process

    def config(self) -> dict:
        return {"arch": "held-view", "w": self.w, "adapter_off": self.adapter_off}

    def forward(self, x, t, cond=None):
        m = self._model[0]
        return m(x, t, cond) if self.w is None else guided(m, self.w)(x, t, cond)


def sd_tscd_config(r: MiniSDRecipe) -> h.TSCDConfig:
    return h.TSCDConfig(segments=h.SEGMENTS, N=r.original_steps + 1, solver="ddim", distance=r.distance,
                        lr=r.stage_lr[0], ema_decay=0.0, chain_teacher=False)


def _stage_config(r: MiniSDRecipe, **stage) -> dict:
    """What a stage's checkpoint records (a stage resumes only with these unchanged; the other stages' settings may
    change without invalidating it)."""
    return {"rank": r.rank, "w": r.w, "distance": r.distance, "original_steps": r.original_steps, "batch": r.batch,
            "grad_clip": r.grad_clip, "seed": r.seed, **stage}


def sd_reward_config(r: MiniSDRecipe) -> h.RewardConfig:
    return h.RewardConfig(t_range=r.reward_t, lambda_reward=r.lambda_reward, lambda_tscd=1.0, lr=r.reward_lr,
                          ema_decay=0.0, N=r.original_steps + 1, solver="ddim", distance=r.distance)


def check_stage_outputs(ckpt_dir: str | os.PathLike, segments: tuple[int, ...] = h.SEGMENTS,
                        reward: bool = False) -> None:
    """Refuse to go on when a later stage has a checkpoint but an earlier stage's output is missing (each stage starts
    from the previous one's adapter: retraining the earlier one would not give the later one's start back)."""
    names = [f"k{k}" for k in segments] + (["reward"] if reward else [])
    have = [(Path(ckpt_dir) / n / TRAINER_WEIGHTS).is_file() for n in names]
    for i, name in enumerate(names):
        if not have[i] and any(have[i + 1:]):
            later = [n for n, ok in zip(names[i + 1:], have[i + 1:]) if ok]
            raise FileNotFoundError(
                f"stage {name}'s output is missing from {Path(ckpt_dir) / name} but the later stage(s) {later} have "
                f"checkpoints: each stage starts from the previous stage's adapter. Restore {name}'s checkpoint, or "
                f"delete {', '.join(str(Path(ckpt_dir) / n) for n in later)} to retrain from {name}")


def train_minisd(sd: Any, r: MiniSDRecipe = SD_RECIPE, data: Callable | None = None, *, ckpt_dir=None,
                 reward_model: nn.Module | None = None, progress: bool = True, log: Callable = print
                 ) -> dict[str, tuple[dict, float]]:
    """Train the unified Hyper-SD LoRA on sd (sd.SD; the adapter is added to sd.model IN PLACE): TSCD's stages
    k = 8 -> 4 -> 2 -> 1 (r.stage_steps updates each; hypersd.tscd_step on sd_grid), then with r.reward_steps > 0
    the reward stage (hypersd.reward_step with reward.sd_reward_fn(sd, reward_model or the shipped one, log=True)).
    data: minisd.digit_batches(sd) by default. Resumable from ckpt_dir (ckpt_dir/k8 ... k1, reward).
    Returns {"tscd": (adapter weights, training seconds), "tscd-reward": (...)} (the adapter's state after each part;
    the student is tcd.TCDModel(sd.model, w_fixed=r.w) with that adapter loaded: `set_adapter_weights`)."""
    require_codec(sd)
    model = sd.model
    if model.lora is None:
        add_lora(model, r=r.rank, target_modules=present_targets(model.unet), seed=r.seed)
    student = TCDModel(model, w_fixed=r.w)
    data = data if data is not None else digit_batches(sd)
    grid = sd_grid(model.process, r.original_steps)
    frozen = {"teacher": _Held(model, r.w, adapter_off=True), "target": _Held(student)}
    if ckpt_dir is not None:
        check_stage_outputs(ckpt_dir, h.SEGMENTS, r.reward_steps > 0)
    sub = lambda name: None if ckpt_dir is None else Path(ckpt_dir) / name
    tcfg, out, t0 = sd_tscd_config(r), {}, time.perf_counter()
    if len(r.stage_lr) != len(tcfg.segments):
        raise ValueError(f"stage_lr needs one rate per stage {tcfg.segments}; got {r.stage_lr}")
    for k, lr in zip(tcfg.segments, r.stage_lr):
        net = Network(student, lr=lr, grad_clip=r.grad_clip, save_frozen=False)
        run = TrainConfig(steps=r.stage_steps, batch_size=r.batch, seed=r.seed, desc=f"Hyper-SD mini SD k={k}")
        done = train_networks({"student": net}, h.tscd_step(tcfg, grid, k), data, run, frozen=frozen,
                              ckpt_dir=sub(f"k{k}"), progress=progress,
                              extra_config={"method": "hyper-sd-tscd-lora", "k": k,
                                            "stage": _stage_config(r, lr=lr)})
        log(f"stage k={k}: {done.step} updates, last losses {_tail(done)}")
    out["tscd"] = (adapter_weights(model), time.perf_counter() - t0)
    if r.reward_steps > 0:
        rm = reward_model if reward_model is not None else load_reward_model()
        rfn = sd_reward_fn(sd, rm, log=True)
        net = Network(student, lr=r.reward_lr, grad_clip=r.grad_clip, save_frozen=False)
        run = TrainConfig(steps=r.reward_steps, batch_size=r.batch, seed=r.seed, desc="Hyper-SD mini SD reward")
        done = train_networks({"student": net}, h.reward_step(sd_reward_config(r), grid, rfn), data, run,
                              frozen=frozen, ckpt_dir=sub("reward"), progress=progress,
                              extra_config={"method": "hyper-sd-reward-lora",
                                            "stage": _stage_config(r, **asdict(sd_reward_config(r)))})
        log(f"reward stage: {done.step} updates, last losses {_tail(done)}")
        out["tscd-reward"] = (adapter_weights(model), time.perf_counter() - t0)
    student.eval()
    return out


def _tail(done: Any, k: int = 10) -> str:
    hist = done.losses.get("student", [])
    return f"{sum(hist[-k:]) / max(1, len(hist[-k:])):.4g}" if hist else "n/a"


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the LoRA adapter's trainable tensors of model (an sd.SDDenoiser with an adapter)."""
    return {k: p.detach().clone() for k, p in model.unet.named_parameters() if "lora_" in k}


def set_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.unet.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def save_minisd(model: nn.Module, folder: str | os.PathLike, w: float, info: dict | None = None) -> Path:
    """The LoRA of model (sd.SDDenoiser with an adapter) in diffusers' format (pipe.load_lora_weights(folder)) and
    hypersd.json: the fixed w, the base UNet's fingerprint, the sampler (TCD's, eta = gamma) and `info`."""
    folder = Path(folder)
    with adapter_disabled(model):
        fp = base_fingerprint(model.unet)
    save_peft_lora(model.unet, folder)
    meta = {"kind": "hyper-sd-lora", "w_fixed": w, "base_fingerprint": fp, "scheduler": "TCDScheduler",
            "gammas": {str(k): v for k, v in SD_GAMMAS.items()}, **(info or {})}
    (folder / HYPERSD_JSON).write_text(json.dumps(meta, indent=2))
    return folder


def load_minisd(sd: Any, folder: str | os.PathLike) -> TCDModel:
    """Load a Hyper-SD LoRA saved by save_minisd onto sd.model (IN PLACE; the base it was distilled on, without an
    adapter) as a TCF student at its fixed w (tcd.TCDModel: sample it with tcd.sss). A missing file or a LoRA for
    another base is refused with a clear error."""
    folder = Path(folder)
    for f in (HYPERSD_JSON, LORA_WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing: {folder} holds no Hyper-SD LoRA (save_minisd writes "
                                    f"one; `{SD_RECREATE}` recreates the shipped ones)")
    meta = json.loads((folder / HYPERSD_JSON).read_text())
    fp = base_fingerprint(sd.model.unet)
    if fp != meta["base_fingerprint"]:
        raise ValueError(f"this Hyper-SD LoRA was distilled on another base model (fingerprint "
                         f"{meta['base_fingerprint']}, this UNet's is {fp}): load it onto its own base "
                         "(minisd.load_mini_sd())")
    load_lora(sd.model, folder)
    return TCDModel(sd.model, w_fixed=meta["w_fixed"]).eval()


def sd_shipped_dir() -> Path:
    return paths.data_dir() / "hypersd"


def load_shipped_minisd(sd: Any, name: str = "tscd") -> TCDModel:
    """The shipped LoRA ("tscd" or "tscd-reward") on sd.model (in place)."""
    if name not in SD_SHIPPED:
        raise ValueError(f"the shipped Hyper-SD LoRAs are {list(SD_SHIPPED)}; got {name!r}")
    return load_minisd(sd, paths.shipped(sd_shipped_dir() / SD_SHIPPED[name], SD_RECREATE))


def shipped_info(name: str = "tscd") -> dict:
    """The shipped LoRA's hypersd.json (command, recipe, updates, training seconds)."""
    folder = paths.shipped(sd_shipped_dir() / SD_SHIPPED[name], SD_RECREATE)
    return json.loads((folder / HYPERSD_JSON).read_text())


# the unified sampler's gamma (TCD's, diffusers' eta) per step count on the mini SD (tcd.sss), chosen on a validation
# seed (5: prompts and noise that the evaluation seeds 0, 1, 2 do not use; n 200, gammas 1, 0.5, 0.3): gamma 1 keeps
# the colour adherence up to four steps (4 steps, TSCD LoRA: colour 0.91 / 0.88 / 0.83, KID 0.180 / 0.173 / 0.176);
# at eight steps 0.5 lowers the KID (0.149 against 0.178) with colour 0.95. Lower gamma with more steps, as
# Hyper-SD's model card advises for its unified LoRA.
SD_GAMMAS = {1: 1.0, 2: 1.0, 4: 1.0, 8: 0.5}


def sd_sampler(steps: int) -> Callable:
    """tcd.sss at SD_GAMMAS[steps], in lcm.multistep's signature (recipes.lcm.evaluate's sampler)."""
    return tcd.sampler(SD_GAMMAS.get(steps, tcd.GAMMA))


def with_reward(sd: Any, images: Callable, reward_model: nn.Module, runs: list) -> Callable:
    """images(prompts, s) -> (n, 3, H, W) in [-1, 1], also appending the mean reward of data/reward's model (NOT the
    judge: the prompted digit and colour read back from the prompts, reward.PromptReader) to `runs`, one per call."""
    reader = PromptReader(sd.text)

    def scored(prompts: list[str], s: int) -> torch.Tensor:
        x = images(prompts, s)
        with torch.no_grad():
            labels, colours = reader(sd.text(prompts).text)
            runs.append(float(reward(reward_model, x.float(), labels, colours).mean()))
        return x
    return scored


def _add_reward(result: dict, runs: list) -> dict:
    for row, r in zip(result["runs"], runs):
        row["reward"] = r
    m = sum(runs) / len(runs)
    result["mean"]["reward"] = m
    result["std"]["reward"] = (sum((r - m) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5
    return result


def evaluate_minisd(sd: Any, student: nn.Module, n: int, steps: int, seeds=(0, 1, 2),
                    reward_model: nn.Module | None = None) -> dict:
    """The mini SD's shared evaluation (minisd.evaluate_images, as recipes.lcm.evaluate runs it: the same prompts and
    noise per seed; adherence, colour adherence, KID/FD against held-out digits) of the LoRA sampled by tcd.sss at
    `steps` steps (gamma SD_GAMMAS[steps]; its fixed w), plus "reward": the mean score of the course's reward model
    (with reward_model; the judge stays the digits classifier)."""
    gamma = SD_GAMMAS.get(steps, tcd.GAMMA)
    images = lambda prompts, s: lcm_sample(sd, student, prompts, steps, None, seed=s, sampler=sd_sampler(steps))
    if reward_model is None:
        return {**lcm_recipes.evaluate(sd, student, n, steps, None, seeds, sampler=sd_sampler(steps)), "gamma": gamma}
    runs: list[float] = []
    result = minisd.evaluate_images(with_reward(sd, images, reward_model, runs), n, seeds, steps=steps, w=None)
    return {**_add_reward(result, runs), "gamma": gamma}


SD_STEPS = (1, 2, 4, 8)
TEACHER_ROWS = "lcm/mini-sd-lcm-lora/lcm.json"   # the 25-step guided teacher's evaluation (n 200, seeds 0, 1, 2)
RESULTS = "hypersd_minisd.json"                   # docs/results/


def teacher_rows() -> dict:
    """The 25-step guided teacher's scores as recipes.lcm's run computed them ({metric: [mean, std]}, its n and
    seeds), read from the shipped LCM-LoRA's lcm.json: the same evaluation (minisd.evaluate_images) as ours."""
    ev = json.loads((paths.data_dir() / TEACHER_ROWS).read_text())["evaluation"]
    return {"n": ev["n"], "seeds": ev["seeds"], "w": ev["w"], "mean_std": ev["mean_std"]["teacher DDIM 25 steps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_lib.recipes.hypersd",
                                     description="Hyper-SD on the mini Stable Diffusion: one unified LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train-minisd", help="TSCD 8->4->2->1 (+ reward feedback) LoRA of the mini SD, shipped")
    p.add_argument("--out", default=str(sd_shipped_dir()))
    p.add_argument("--stage-steps", type=int, default=SD_RECIPE.stage_steps)
    p.add_argument("--reward-steps", type=int, default=SD_RECIPE.reward_steps)
    p.add_argument("--batch", type=int, default=SD_RECIPE.batch)
    p.add_argument("--ckpt", default=None, help="checkpoint folder (default: the cache's hypersd_minisd_<seed>)")
    p.add_argument("--threads", type=int, default=0)
    e = sub.add_parser("evaluate-minisd", help="held-out KID and adherence of the shipped LoRAs at 1/2/4/8 steps")
    e.add_argument("--out", default=str(sd_shipped_dir()))
    e.add_argument("--n-eval", type=int, default=200)
    e.add_argument("--results", default=None, help=f"the JSON to write (default docs/results/{RESULTS})")
    e.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.command == "train-minisd":
        r = replace(SD_RECIPE, stage_steps=args.stage_steps, reward_steps=args.reward_steps, batch=args.batch)
        sd = minisd.load_mini_sd()
        data = digit_batches(sd)
        ckpt = Path(args.ckpt) if args.ckpt else paths.cache_dir() / f"hypersd_minisd_{r.seed}"
        stages = [f"k{k}" for k in h.SEGMENTS] + ["reward"]
        resumed = [n for n in stages if (ckpt / n / TRAINER_WEIGHTS).is_file()]    # checkpoints before this call
        parts = train_minisd(sd, r, data, ckpt_dir=ckpt)
        updates = {"tscd": r.stage_steps * len(h.SEGMENTS), "tscd-reward": r.stage_steps * len(h.SEGMENTS)
                   + r.reward_steps}
        for name, (weights, secs) in parts.items():
            set_adapter_weights(sd.model, weights)
            folder = save_minisd(sd.model, out / SD_SHIPPED[name], r.w, {
                "command": f"{SD_RECREATE} (stage steps {r.stage_steps}, reward steps {r.reward_steps})",
                "recipe": asdict(r), "updates": updates[name], "train_seconds": round(secs),
                "threads": torch.get_num_threads(), "seconds_per_update": round(secs / updates[name], 3),
                # train_seconds counts this call only: a stage resumed from its checkpoint counts its rest
                **({"resumed_stages": resumed} if resumed else {})})
            print(f"saved {folder}: {updates[name]} updates, {secs:.0f} s of training in this call"
                  + (f" (resumed: {', '.join(resumed)})" if resumed else ""), flush=True)
        return
    seeds = (0, 1, 2)
    teacher = teacher_rows()
    results: dict[str, Any] = {"n": args.n_eval, "seeds": list(seeds), "w": SD_RECIPE.w,
                               "sampler": "tcd.sss (diffusers' TCDScheduler, eta = gamma)",
                               "gammas": {str(k): v for k, v in SD_GAMMAS.items()},
                               "teacher DDIM 25 steps": teacher, "models": {}}
    rm = load_reward_model()
    sd = minisd.load_mini_sd()
    runs: list[float] = []
    minisd.evaluate_images(with_reward(sd, lambda prompts, s: minisd.sample(sd, prompts, 25, teacher["w"], seed=s),
                                       rm, runs), teacher["n"], teacher["seeds"])
    m = _add_reward({"runs": [{} for _ in runs], "mean": {}, "std": {}}, runs)
    teacher["mean_std"]["reward"] = [round(m["mean"]["reward"], 4), round(m["std"]["reward"], 4)]
    print("teacher reward", teacher["mean_std"]["reward"], flush=True)
    for name, folder in SD_SHIPPED.items():
        if not (out / folder / HYPERSD_JSON).is_file():
            print(f"skipping {name}: {out / folder} holds no LoRA", flush=True)
            continue
        sd = minisd.load_mini_sd()
        student = load_minisd(sd, out / folder)
        info = json.loads((out / folder / HYPERSD_JSON).read_text())
        rows = {}
        for k in SD_STEPS:
            t0 = time.time()
            rows[str(k)] = lcm_recipes.summary(evaluate_minisd(sd, student, args.n_eval, k, seeds, reward_model=rm))
            print(name, k, rows[str(k)], f"{time.time() - t0:.0f} s", flush=True)
        results["models"][name] = {"steps": rows, "train_seconds": info.get("train_seconds"),
                                   "updates": info.get("updates"), "command": info.get("command")}
    path = Path(args.results) if args.results else Path(__file__).resolve().parents[2] / "docs" / "results" / RESULTS
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
