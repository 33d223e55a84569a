"""The SPO training loop: rollout -> select pairs -> loss -> step -> log, one round at a time.

Win and lose share x_t, so μ_θ(x_t) is the same for both: one policy UNet call and one reference call
(the LoRA switched off) per pair, each at CFG batch 2, instead of the published four.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from spo.config import TrainSPOConfig
from spo.diffusion.conditioning import PromptConditioning
from spo.diffusion.ddim import ddim_step, gaussian_log_prob
from spo.diffusion.guidance import guided_noise_pred
from spo.diffusion.sampling import latent_shape
from spo.models.diffusion_model import DiffusionModel
from spo.models.lora import adapter_disabled
from spo.tracking.progress import progress
from spo.tracking.tracker import Tracker
from spo.training.spo_loss import spo_loss
from spo.training.step_sampling import (
    RolloutSettings,
    ScoreFn,
    StepPairs,
    rollout_pairs,
)


@dataclass
class PairLogProbs:
    policy_win: torch.Tensor  # (N,) with grad
    policy_lose: torch.Tensor
    ref_win: torch.Tensor  # (N,) no grad
    ref_lose: torch.Tensor


def rollout_settings(cfg: TrainSPOConfig) -> RolloutSettings:
    return RolloutSettings(num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                           num_candidates=cfg.num_candidates, branch_start_step=cfg.branch_start_step,
                           threshold=cfg.threshold)


def pair_log_probs(model: DiffusionModel, pairs: StepPairs, cond: PromptConditioning, uncond: PromptConditioning,
                   cfg: TrainSPOConfig) -> PairLogProbs:
    """log p(x_win | x_t) and log p(x_lose | x_t) under the policy and the reference (cond: N rows)."""
    def log_probs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        noise_pred = guided_noise_pred(unet, pairs.latents_t, pairs.timesteps, cond, uncond, cfg.guidance_scale)
        step = ddim_step(model.scheduler, noise_pred.float(), pairs.timesteps, pairs.latents_t.float(), cfg.eta)
        return (gaussian_log_prob(pairs.latents_win, step.mean, step.sigma),
                gaussian_log_prob(pairs.latents_lose, step.mean, step.sigma))

    policy_win, policy_lose = log_probs(model.unet)
    with torch.no_grad(), adapter_disabled(model.unet) as reference:
        ref_win, ref_lose = log_probs(reference)
    return PairLogProbs(policy_win, policy_lose, ref_win, ref_lose)


def optimizer_chunks(num_pairs: int, chunk: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index chunks of `chunk` pairs (the last may be smaller): one optimizer step each."""
    if num_pairs > 0:
        yield from torch.randperm(num_pairs, generator=generator).split(chunk)


def train_step(model: DiffusionModel, pairs: StepPairs, cond: PromptConditioning, uncond: PromptConditioning,
               cfg: TrainSPOConfig, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               autocast: Callable[[], object]) -> dict[str, float]:
    """One optimizer step over `pairs`, in micro-batches of `pairs_per_batch` (gradient accumulation)."""
    optimizer.zero_grad(set_to_none=True)
    total, logs = len(pairs), {"loss": 0.0, "ratio_win": 0.0, "ratio_lose": 0.0}
    for micro in torch.arange(total).split(cfg.pairs_per_batch):
        batch = pairs.select(micro)
        with autocast():
            lp = pair_log_probs(model, batch, cond[batch.prompt_index], uncond, cfg)
            out = spo_loss(lp.policy_win, lp.policy_lose, lp.ref_win, lp.ref_lose, beta=cfg.beta, clip_eps=cfg.clip_eps)
        (out.loss * len(micro) / total).backward()
        logs["loss"] += out.loss.item() * len(micro) / total
        logs["ratio_win"] += out.ratio_win.sum().item() / total
        logs["ratio_lose"] += out.ratio_lose.sum().item() / total
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    logs["grad_norm"] = float(grad_norm)
    return logs


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainSPOConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def prompt_rounds(prompts: list[str], cfg: TrainSPOConfig, seed: int) -> Iterator[tuple[int, list[str]]]:
    """(epoch, prompts of one round): each epoch shuffles the prompt list."""
    rng = random.Random(seed)
    for epoch in range(cfg.num_epochs):
        order = list(prompts)
        rng.shuffle(order)
        for start in range(0, len(order), cfg.prompts_per_round):
            yield epoch, order[start:start + cfg.prompts_per_round]


def num_rounds(num_prompts: int, cfg: TrainSPOConfig) -> int:
    return cfg.num_epochs * math.ceil(num_prompts / cfg.prompts_per_round)


def train_spo(model: DiffusionModel, score_fn_for: Callable[[list[str]], ScoreFn], prompts: list[str],
              params: list[torch.nn.Parameter], cfg: TrainSPOConfig, *, resolution: int, seed: int,
              tracker: Tracker, history: list[dict[str, float]]) -> None:
    """Run every round; `score_fn_for(prompts)` binds the SPM to a round's prompts. Appends to `history`."""
    optimizer = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(seed)
    use_bf16 = cfg.mixed_precision == "bf16" and model.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    uncond = model.encode_negative(resolution)
    step = 0
    bar = progress(prompt_rounds(prompts, cfg, seed), desc="train_spo", total=num_rounds(len(prompts), cfg),
                   unit="round")
    for round_idx, (epoch, round_prompts) in enumerate(bar):
        cond = model.encode_prompts(round_prompts, resolution)
        init = torch.randn((len(round_prompts), *latent_shape(model, resolution)), generator=generator)
        model.unet.eval()
        with autocast():
            pairs, stats = rollout_pairs(model, cond, uncond, rollout_settings(cfg), score_fn_for(round_prompts),
                                         init.to(model.device), generator)
        scores = torch.cat(stats.scores)
        round_logs = {"kept_pair_rate": stats.kept_pair_rate, "num_pairs": float(len(pairs)),
                      "spm_score_mean": scores.mean().item(), "spm_score_std": scores.std().item()}
        tracker.log_metrics(round_logs, step=step)
        model.unet.train()
        chunk = cfg.pairs_per_batch * cfg.gradient_accumulation_steps
        for idx in optimizer_chunks(len(pairs), chunk, generator):
            logs = train_step(model, pairs.select(idx), cond, uncond, cfg, params, optimizer, autocast)
            step += 1
            tracker.log_metrics(logs, step=step)
            history.append({"step": step, "epoch": epoch, "round": round_idx, **logs, **round_logs})
        bar.set_postfix(epoch=epoch, kept=f"{stats.kept_pair_rate:.2f}", step=step,
                        loss=f"{history[-1]['loss']:.4f}" if history else "-", refresh=False)
    model.unet.eval()
