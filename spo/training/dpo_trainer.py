"""The Diffusion-DPO loop (DESIGN 3.3): planned batches of decided pairs -> latents -> the same t and noise
for both images -> policy and reference denoising errors -> the DPO loss -> an optimizer step.

Ties (label 0.5 / 0.5) are dropped and counted, as in the paper's code; the winner is whichever image
has label 1. Every draw is planned from the seed: the batches (shuffled epoch by epoch, as the SPM's),
one t ~ U{0..T-1} per pair, and for each pair its own generator for the VAE posterior noise of both
images and the shared diffusion noise ε. So N processes (each takes every N-th pair of a step) take the
optimizer steps of one, and a resumed run the steps of an uninterrupted one.

The policy sees winner and loser in one UNet call (2B rows) and the reference in another: the LoRA
switched off, or a frozen copy for a full fine-tune. The target is ε (or the velocity for
v-prediction models); errors are means over latent elements, as the paper's code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import numpy as np
import torch

from spo.config import TrainDPOConfig
from spo.models.diffusion_model import DiffusionModel
from spo.tracking.progress import progress
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy
from spo.training.distributed import Processes, average_gradients, global_sum
from spo.training.dpo_loss import dpo_loss
from spo.training.learning_curve import LearningCurve
from spo.training.spm_inputs import TrainingPairs, X0Job, plan_training_jobs
from spo.training.spm_training import PairLoader
from spo.training.spo_trainer import ONE_PROCESS, autocast_for, derived_seed, make_scheduler, peak_memory_gb
from spo.training.trainable_unet import ReferenceFn, lora_reference

HISTORY_FIELDS = ("step", "loss", "implicit_accuracy", "reward_margin", "model_mse_win", "model_mse_lose",
                  "ref_mse_win", "ref_mse_lose", "grad_norm", "lr", "pairs_per_second", "pairs_seen",
                  "train_seconds", "peak_memory_gb")


@dataclass(frozen=True)
class DecidedPairs:
    """The train rows with a decision, and which image won (True: image 0)."""

    rows: list[int]
    winner_is_0: dict[int, bool]
    num_ties: int

    @property
    def num_pairs(self) -> int:
        return len(self.rows)


def decided_pairs(pairs: TrainingPairs) -> DecidedPairs:
    """Drop ties (and any label other than 0/1, which `validate` quarantines) from the train split."""
    label_0 = pairs.column("label_0", pairs.train_indices).astype(float)
    decided = (label_0 == 0.0) | (label_0 == 1.0)
    rows = [i for i, keep in zip(pairs.train_indices, decided) if keep]
    if not rows:
        raise ValueError(f"no decided pairs to train DPO on: all {len(label_0)} train pairs are ties")
    return DecidedPairs(rows, {i: bool(v == 1.0) for i, v, keep in zip(pairs.train_indices, label_0, decided)
                               if keep}, int((~decided).sum()))


def plan_steps(pairs: DecidedPairs, cfg: TrainDPOConfig, num_train_timesteps: int, seed: int) -> list[X0Job]:
    """One job per optimizer step: `pairs_per_step` rows, a t per row, a seed for the step's noise."""
    return plan_training_jobs(pairs.rows, cfg.max_steps, cfg.pairs_per_step, num_train_timesteps, seed)


def learning_rate(cfg: TrainDPOConfig) -> float:
    """As published with scale_lr: the base rate times the pairs of an optimizer step (1e-8 x 2048)."""
    return cfg.learning_rate * cfg.pairs_per_step if cfg.scale_lr else cfg.learning_rate


def pair_latents(model: DiffusionModel, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE posterior samples, one generator per image: z = (μ + σ·n) · scaling_factor."""
    with torch.no_grad():
        dist = model.vae.encode(images.to(model.vae.device, model.vae.dtype)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
        latents = dist.mean.float() + dist.std.float() * noise.to(dist.mean.device)
    return latents * model.vae.config.scaling_factor


@dataclass
class DenoisingErrors:
    model_win: torch.Tensor  # (N,) with grad
    model_lose: torch.Tensor
    ref_win: torch.Tensor  # (N,) no grad
    ref_lose: torch.Tensor


def denoising_errors(model: DiffusionModel, latents_win: torch.Tensor, latents_lose: torch.Tensor,
                     noise: torch.Tensor, timesteps: torch.Tensor, prompts: list[str], resolution: int,
                     reference: ReferenceFn | None = None) -> DenoisingErrors:
    """Per-pair mean squared errors of the policy and the reference at the pair's t, noise shared."""
    scheduler = model.scheduler
    device = model.device
    z = torch.cat([latents_win, latents_lose]).to(device)
    eps = torch.cat([noise, noise]).to(device)
    t = torch.cat([timesteps, timesteps]).to(device).long()
    x_t = scheduler.add_noise(z, eps, t)
    target = scheduler.get_velocity(z, eps, t) if scheduler.config.prediction_type == "v_prediction" else eps
    cond = model.encode_prompts(prompts, resolution).repeat(2)

    def errors(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        c = cond.to(dtype=unet.dtype)
        pred = unet(x_t.to(unet.dtype), t, **c.unet_kwargs()).sample
        mse = (pred.float() - target.float()).pow(2).mean(dim=list(range(1, pred.ndim)))
        return mse.chunk(2)

    model_win, model_lose = errors(model.unet)
    with torch.no_grad(), (reference or lora_reference(model))() as ref_unet:
        ref_win, ref_lose = errors(ref_unet)
    return DenoisingErrors(model_win, model_lose, ref_win, ref_lose)


@dataclass
class DPOBatch:
    prompts: list[str]
    latents_win: torch.Tensor
    latents_lose: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def load_step_pairs(model: DiffusionModel, load_batch: PairLoader, pairs: DecidedPairs, job: X0Job,
                    positions: list[int]) -> DPOBatch:
    """The pairs at `positions` of a step's job, winner first, with their planned draws."""
    rows = [job.indices[p] for p in positions]
    batch = load_batch(rows)
    win_first = torch.tensor([pairs.winner_is_0[r] for r in rows]).view(-1, 1, 1, 1)
    images_win = torch.where(win_first, batch.images_0, batch.images_1)
    images_lose = torch.where(win_first, batch.images_1, batch.images_0)
    generators = [torch.Generator().manual_seed(derived_seed(job.seed, "pair", p)) for p in positions]
    latents_win = pair_latents(model, images_win, generators)  # each generator: w's posterior noise,
    latents_lose = pair_latents(model, images_lose, generators)  # then l's, then the shared ε
    noise = torch.stack([torch.randn(latents_win.shape[1:], generator=g) for g in generators])
    return DPOBatch(batch.prompts, latents_win, latents_lose, noise,
                    torch.tensor([job.timesteps[p] for p in positions]))


@dataclass
class DPORunOptions:
    processes: Processes = ONE_PROCESS
    checkpoints: CheckpointPolicy | None = None
    resume: dict | None = None
    reference: ReferenceFn | None = None  # None: the LoRA-disabled UNet
    curve: LearningCurve | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainDPOConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=learning_rate(cfg), betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def train_dpo(model: DiffusionModel, load_batch: PairLoader, pairs: DecidedPairs, params: list[torch.nn.Parameter],
              cfg: TrainDPOConfig, *, resolution: int, seed: int, tracker: Tracker,
              options: DPORunOptions | None = None) -> list[dict[str, float]]:
    """Run `cfg.max_steps` optimizer steps; returns the history (one row per step)."""
    options = options or DPORunOptions()
    procs = options.processes
    if cfg.pairs_per_step % procs.world_size:
        raise ValueError(f"train_dpo.pairs_per_step ({cfg.pairs_per_step}) must be a multiple of the number of "
                         f"processes ({procs.world_size}) for every process to take an equal share of a step")
    jobs = plan_steps(pairs, cfg, model.scheduler.config.num_train_timesteps, seed)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" and model.device.type == "cuda" else None
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    autocast: Callable[[], AbstractContextManager] = autocast_for(cfg, model.device)
    history, first, train_seconds = options.history, 0, 0.0
    curve = options.curve
    if options.resume is not None:
        state = options.resume
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved.to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history[:] = list(state["history"])
        first, train_seconds = int(state["step"]), float(state["train_seconds"])
        if curve is not None:
            curve.rows[:] = list(state.get("curve", []))
    pairs_seen = first * cfg.pairs_per_step
    if curve is not None:
        curve.maybe_measure(model, first, step=first, train_seconds=train_seconds, pairs_seen=pairs_seen,
                            is_main=procs.is_main)
    model.unet.train()
    bar = progress(range(first, cfg.max_steps), desc="train_dpo", total=cfg.max_steps, initial=first, unit="step")
    for step_index in bar:
        start = time.perf_counter()
        job = jobs[step_index]
        mine = list(range(procs.rank, len(job.indices), procs.world_size))
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(8, dtype=torch.float64)  # loss, accuracy, margin, 4 errors, pairs
        for micro in np.array_split(mine, max(1, math.ceil(len(mine) / cfg.pairs_per_batch))):
            micro = [int(p) for p in micro]
            batch = load_step_pairs(model, load_batch, pairs, job, micro)
            with autocast():
                err = denoising_errors(model, batch.latents_win, batch.latents_lose, batch.noise, batch.timesteps,
                                       batch.prompts, resolution, options.reference)
            out = dpo_loss(err.model_win, err.model_lose, err.ref_win, err.ref_lose, beta=cfg.beta)
            loss = out.loss * len(micro) / len(mine)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            sums += torch.tensor([out.loss.item() * len(micro), out.implicit_accuracy.sum().item(),
                                  out.inside.detach().sum().item(), err.model_win.detach().sum().item(),
                                  err.model_lose.detach().sum().item(), err.ref_win.sum().item(),
                                  err.ref_lose.sum().item(), len(micro)], dtype=torch.float64)
        average_gradients(params)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        sums = global_sum(sums.to(procs.device)).cpu()
        n = max(sums[7].item(), 1.0)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        pairs_seen += int(n)
        step = step_index + 1
        logs = {"loss": sums[0].item() / n, "implicit_accuracy": sums[1].item() / n, "reward_margin": sums[2].item() / n,
                "model_mse_win": sums[3].item() / n, "model_mse_lose": sums[4].item() / n,
                "ref_mse_win": sums[5].item() / n, "ref_mse_lose": sums[6].item() / n, "grad_norm": float(grad_norm),
                "lr": float(lr), "pairs_per_second": n / max(seconds, 1e-9), "pairs_seen": float(pairs_seen),
                "train_seconds": train_seconds, "peak_memory_gb": peak_memory_gb(model.device)}
        if procs.is_main:
            tracker.log_metrics(logs, step=step)
        history.append({"step": step, **logs})
        bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}", refresh=False)
        if curve is not None:
            curve.maybe_measure(model, step, step=step, train_seconds=train_seconds, pairs_seen=pairs_seen,
                                is_main=procs.is_main)
        if options.checkpoints is not None and options.checkpoints.due(step, cfg.max_steps) and procs.is_main:
            options.checkpoints.save(step, {
                "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "history": list(history), "train_seconds": train_seconds,
                "curve": list(curve.rows) if curve is not None else []})
    model.unet.eval()
    return history
