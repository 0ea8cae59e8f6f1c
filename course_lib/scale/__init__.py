"""The course's Stable Diffusion scale-up: the notebooks' loss functions on SD 1.5 with diffusers + accelerate.

One module per role, each a command line (`python -m course_lib.scale.<module> --help`), each with a shipped config
(configs/<module>.json; every setting also a flag):

    data               prompt sources (course list, text, COCO captions, webdataset / parquet shards) -> cached
                       embeddings
    triplets           InstaFlow's (noise, teacher latent, prompt) from the guided teacher, on every process, resumable
    instaflow_reflow   InstaFlow's stage 1: conditional reflow of the SD UNet read as a velocity (full, or LoRA on
                       one GPU)
    instaflow_distill  InstaFlow's stage 2: one-step distillation of the 2-RF (L2, then LPIPS / the offline Lap1
                       substitute)
    export             diffusers pipeline (one-step via a stock scheduler), LoRA in diffusers and kohya formats
    evaluate           COCO FID / CLIP score protocol, latency and throughput, sample grid, the digits (mini-SD) path
    lcm_lora           LCM-LoRA: notebook 06's LCD loss training a LoRA (the teacher is the same UNet with its adapter
                       disabled), diffusers + kohya export, the SD 1.5 memory/time plan (--plan)
    dmd2               DMD2: notebook 09's method step training a one- or four-step generator and its critic
    hypersd            Hyper-SD: notebook 11's TSCD (stages tscd-8, tscd-4, tscd-2, tscd-1) and reward feedback
                       (--stage reward, ImageReward / LAION aesthetic from local weights) training one LoRA for 1 to
                       8 steps with TCDScheduler; diffusers + kohya export; the SD 1.5 plan in its docstring
    cost               peak memory and step time of a training step of the real SD 1.5 UNet (reflow, DMD2, LCM-LoRA);
                       the papers' budgets in GPU-hours; Hyper-SD's stages as estimates from the measured UNet calls

and the SD-scale reward models (rewards: ImageReward, the LAION aesthetic predictor; local weights only, refused with
what to download where they are missing). Three modules they share (no command): common (config files + flags, fingerprints of pretrained parts, atomic
files, stage.json, the InstaFlow student), stage (what the training stages share: the engine's settings, the process
group, their data, the train-then-export run) and methods (a stage's step or networks that cost.py times too).

Multi-process stages run under `accelerate launch --multi_gpu` or `torchrun` (DDP; the DMD2 stage also shards with
--fsdp: SD 1.5's UNets fit one GPU, so DDP is enough for it). Importing this package imports no diffusers/transformers.
"""
