"""Training the step-aware preference model (DESIGN 3.1), as small phases with tests.

Notation map (SPO paper §4.2 / published `spm_task.py` -> code), B pairs per batch:
    x^0, x^1 (clean pair)            batch.images_0, batch.images_1     (B, 3, H, W) in [-1, 1]
    z = E(x)·scaling_factor          latents_0, latents_1               (B, C, h, w)
    ε (shared by the pair)           noise
    z_t = sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε  noisy latents (scheduler.add_noise)
    ε̂ (CFG, empty negative)          noise_pred (spo.diffusion.guidance)
    x̂0 = D((z_t − sqrt(1−ᾱ_t)·ε̂)/sqrt(ᾱ_t))  noisy_x0_images(...)    (B, 3, H, W)
    s_i = exp(τ)·cos(f_V(x̂0^i, t), f_T(c))   scores_0, scores_1        (B,)
    L = CE(softmax([s_0, s_1]), [y_0, y_1]) + log 0.5·[tie]           spm_loss

Phases: `train_preference_backbone` (optional: makes the PickScore analogue on clean images) ->
`train_spm` (the SPM on one-step x̂0 predictions) -> `evaluate_accuracy` (pairwise, ties excluded).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from spo.config import TrainSPMConfig
from spo.diffusion.ddim import predict_x0
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.tracking.progress import progress
from spo.tracking.tracker import Tracker

if TYPE_CHECKING:  # spm_inputs builds on this module's helpers
    from spo.training.spm_inputs import X0Job, X0Source

AutocastFactory = Callable[[], AbstractContextManager]


@dataclass
class PairBatch:
    """B preference pairs: a prompt, two images in [-1, 1], soft labels (ties are 0.5 / 0.5)."""

    prompts: list[str]
    images_0: torch.Tensor  # (B, 3, H, W)
    images_1: torch.Tensor  # (B, 3, H, W)
    label_0: torch.Tensor  # (B,)
    label_1: torch.Tensor  # (B,)


PairLoader = Callable[[Sequence[int]], PairBatch]  # row indices -> decoded batch


# ----------------------------------------------------------------------------------------------------
# inputs of the SPM: one-step x̂0 predictions of the frozen base model


def _encode_pair(model: DiffusionModel, images_0: torch.Tensor, images_1: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior samples of both images with the same posterior noise, scaled; float32."""
    images = torch.cat([images_0, images_1]).to(model.vae.device, model.vae.dtype)
    posterior = model.vae.encode(images).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()
    eps = torch.randn(mean[: images_0.shape[0]].shape, generator=generator).to(mean.device)
    latents = (mean + std * torch.cat([eps, eps])) * model.vae.config.scaling_factor
    return latents.chunk(2)


@torch.no_grad()
def noisy_x0_images(model: DiffusionModel, images_0: torch.Tensor, images_1: torch.Tensor, prompts: list[str],
                    timesteps: torch.Tensor, guidance_scale: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded one-step x̂0 of both images of each pair, noised at t with the **same** noise.

    The two images of a pair also share the VAE posterior noise (the published code drew it
    independently; the SD VAE's posterior std is tiny), so identical images give identical x̂0.
    At t = 0 this is still the one-step prediction (≈ the clean image), as in training.
    """
    latents_0, latents_1 = _encode_pair(model, images_0, images_1, generator)
    noise = torch.randn(latents_0.shape, generator=generator).to(latents_0.device)
    timesteps = timesteps.to(latents_0.device).long()
    timesteps_2 = torch.cat([timesteps, timesteps])
    latents_t = model.scheduler.add_noise(torch.cat([latents_0, latents_1]), torch.cat([noise, noise]), timesteps_2)
    cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([""])
    noise_pred = guided_noise_pred(model.unet, latents_t, timesteps_2, torch.cat([cond, cond]), uncond, guidance_scale)
    x0_pred = predict_x0(model.scheduler, noise_pred.float(), timesteps_2, latents_t.float())
    return model.decode_latents(x0_pred).chunk(2)


# ----------------------------------------------------------------------------------------------------
# loss, accuracy, labels


def spm_loss(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
             label_1: torch.Tensor) -> torch.Tensor:
    """PickScore's loss without in-batch negatives: soft-label CE over [s0, s1], batch mean.

    Ties add log 0.5, so a perfectly tied pair scores 0 (as in the published criterion).
    """
    log_probs = torch.log_softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)  # (B, 2)
    labels = torch.stack([label_0, label_1], dim=-1).to(log_probs)
    loss = -(labels * log_probs).sum(-1)
    loss = loss + (label_0 == label_1).to(loss) * math.log(0.5)
    return loss.mean()


def pairwise_correct(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
                     label_1: torch.Tensor) -> tuple[int, int]:
    """(correct, counted) over non-tie pairs: correct when the preferred image scores strictly higher."""
    decisive = label_0 != label_1
    prefers_0 = (label_0 > label_1)[decisive]
    says_0 = (scores_0 > scores_1)[decisive]
    says_1 = (scores_1 > scores_0)[decisive]
    correct = torch.where(prefers_0, says_0, says_1)
    return int(correct.sum()), int(decisive.sum())


def pairwise_accuracy(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
                      label_1: torch.Tensor) -> float:
    """Fraction of non-tie pairs ranked right; NaN when every pair is a tie."""
    correct, counted = pairwise_correct(scores_0, scores_1, label_0, label_1)
    return correct / counted if counted else float("nan")


def pickscore_labels(scores_0: torch.Tensor, scores_1: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL recipe: softmax gap p0 − p1 > threshold -> (1, 0), < −threshold -> (0, 1), else a tie."""
    probs = torch.softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)
    gap = probs[:, 0] - probs[:, 1]
    label_0 = torch.full_like(gap, 0.5)
    label_0[gap > threshold] = 1.0
    label_0[gap < -threshold] = 0.0
    return label_0, 1.0 - label_0


def relabelled_by_backbone(load_batch: PairLoader, labeller: StepAwarePreferenceModel, threshold: float,
                           autocast: AutocastFactory = nullcontext) -> PairLoader:
    """Wrap a loader so labels come from a frozen backbone's scores on the clean images."""

    @torch.no_grad()
    def load(indices: Sequence[int]) -> PairBatch:
        batch = load_batch(indices)
        with autocast():
            text = labeller.encode_text(batch.prompts)
            scores_0 = labeller.scale_cosine(labeller.backbone_image_embeds(batch.images_0), text)
            scores_1 = labeller.scale_cosine(labeller.backbone_image_embeds(batch.images_1), text)
        label_0, label_1 = pickscore_labels(scores_0.float().cpu(), scores_1.float().cpu(), threshold)
        return replace(batch, label_0=label_0, label_1=label_1)

    return load


def frozen_copy(spm: StepAwarePreferenceModel) -> StepAwarePreferenceModel:
    """A detached, eval-mode copy (the PickScore labeller of the SDXL recipe)."""
    return copy.deepcopy(spm).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                   named_params: Sequence[tuple[str, nn.Parameter]] | None = None) -> torch.optim.AdamW:
    """AdamW; biases, norms, gates, logit scale (1-D params) are not decayed (decay would pull the
    identity-initialised gates toward 0 and shrink the temperature)."""
    named = list(named_params) if named_params is not None else list(model.named_parameters())
    decay = [p for _, p in named if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in named if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)


def warmup_decay_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                          total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak over `warmup_steps`, then linear decay to 0 at `total_steps`: diffusers'
    "linear" schedule, stepped once per optimizer step (step s < warmup runs at s/warmup of the peak, so
    step 0 at lr 0)."""
    return get_scheduler("linear", optimizer, num_warmup_steps=min(max(warmup_steps, 0), total_steps),
                         num_training_steps=total_steps)


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float) -> float:
    """Clip (a list, not an iterator: the clip must actually see the grads), step, zero. Returns the
    gradient norm before clipping. `max_grad_norm` <= 0 disables clipping."""
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def batch_indices(indices: Sequence[int], batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches over `indices`, reshuffled each epoch; an epoch's short last batch is dropped
    (with fewer pairs than `batch_size`, each batch is all of them)."""
    indices = list(indices)
    if not indices:
        raise ValueError("no training pairs")
    size = min(batch_size, len(indices))
    while True:
        order = torch.randperm(len(indices), generator=generator).tolist()
        for start in range(0, len(order) - size + 1, size):
            yield [indices[i] for i in order[start:start + size]]


def autocast_factory(mixed_precision: str, device: torch.device) -> AutocastFactory:
    """bf16 autocast on CUDA when asked; fp32 on CPU (bf16 matmuls are slower there)."""
    if mixed_precision == "fp16":
        raise ValueError("train_spm.mixed_precision: 'fp16' is not supported (needs loss scaling); use 'bf16' or 'fp32'")
    if mixed_precision == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


# ----------------------------------------------------------------------------------------------------
# the two training phases share one loop: batch -> pair scores -> loss -> clipped AdamW step -> log

PairScorer = Callable[[int, PairBatch], tuple[torch.Tensor, torch.Tensor]]


def fit_pairs(spm: StepAwarePreferenceModel, named_params: list[tuple[str, nn.Parameter]], pair_scores: PairScorer,
              load_batch: PairLoader, batches: Iterator[list[int]] | Iterator[tuple[int, ...]], *,
              learning_rate: float, steps: int, cfg: TrainSPMConfig, tracker: Tracker, prefix: str) -> list[float]:
    """`steps` AdamW steps (warmup-decay, clipped) of `spm_loss` on `pair_scores`; logs `{prefix}/…`.
    `pair_scores(step, batch)` scores both images of the step's batch (step counts from 0)."""
    params = [p for _, p in named_params]
    optimizer = make_optimizer(spm, learning_rate, cfg.weight_decay, named_params)
    scheduler = warmup_decay_schedule(optimizer, cfg.warmup_steps, steps)
    losses = []
    spm.train()
    bar = progress(range(1, steps + 1), desc=f"train_spm: {prefix}")
    for step in bar:
        batch = load_batch(next(batches))
        scores_0, scores_1 = pair_scores(step - 1, batch)
        label_0, label_1 = batch.label_0.to(scores_0.device), batch.label_1.to(scores_0.device)
        loss = spm_loss(scores_0.float(), scores_1.float(), label_0, label_1)
        loss.backward()
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(params, optimizer, scheduler, cfg.grad_clip)
        losses.append(loss.item())
        logs = {f"{prefix}/loss": loss.item(), f"{prefix}/lr": lr, f"{prefix}/grad_norm": grad_norm}
        accuracy = pairwise_accuracy(scores_0.detach(), scores_1.detach(), label_0, label_1)
        if not math.isnan(accuracy):
            logs[f"{prefix}/accuracy"] = accuracy
        tracker.log_metrics(logs, step=step)
        bar.set_postfix(loss=f"{_recent_mean(losses):.4f}", lr=f"{lr:.1e}", refresh=False)
    spm.eval()
    return losses


def _recent_mean(values: list[float], window: int = 20) -> float:
    """The loss a progress bar shows: one batch of 16 pairs is too noisy to read."""
    tail = values[-window:]
    return sum(tail) / len(tail)


def backbone_pair_scores(spm: StepAwarePreferenceModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-backbone scores of both clean images of each pair (one vision call for both)."""
    text = spm.encode_text(batch.prompts)
    image_embeds_0, image_embeds_1 = spm.backbone_image_embeds(torch.cat([batch.images_0, batch.images_1])).chunk(2)
    return spm.scale_cosine(image_embeds_0, text), spm.scale_cosine(image_embeds_1, text)


def train_preference_backbone(spm: StepAwarePreferenceModel, load_batch: PairLoader, train_indices: Sequence[int],
                              cfg: TrainSPMConfig, *, tracker: Tracker, generator: torch.Generator,
                              autocast: AutocastFactory = nullcontext) -> list[float]:
    """Phase 1 (optional): fine-tune the plain CLIP backbone on clean pairs into the PickScore analogue.

    Only `spm.clip` gets gradients, so the time conditioning stays at its identity init: afterwards
    the SPM is exactly the identity-initialised SPM of the fine-tuned backbone. Returns the losses.
    """
    def pair_scores(step: int, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast():
            return backbone_pair_scores(spm, batch)

    named = [(n, p) for n, p in spm.named_parameters() if n.startswith("clip.")]
    batches = batch_indices(train_indices, cfg.batch_size, generator)
    return fit_pairs(spm, named, pair_scores, load_batch, batches, learning_rate=cfg.preference_learning_rate,
                     steps=cfg.preference_steps, cfg=cfg, tracker=tracker, prefix="preference")


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0, …, T−1}, one per pair, (B,) long."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


def spm_pair_scores(spm: StepAwarePreferenceModel, images_0: torch.Tensor, images_1: torch.Tensor,
                    prompts: list[str], timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPM scores of both images of each pair at the pair's timestep (one vision call for both)."""
    text = spm.encode_text(prompts)
    scores = spm.score(torch.cat([images_0, images_1]), torch.cat([text, text]), torch.cat([timesteps, timesteps]))
    return scores.chunk(2)


def train_spm(spm: StepAwarePreferenceModel, load_batch: PairLoader, jobs: Sequence[X0Job], x0_source: X0Source,
              cfg: TrainSPMConfig, *, tracker: Tracker, autocast: AutocastFactory = nullcontext) -> list[float]:
    """Phase 2: one step per planned job (`spm_inputs.plan_training_jobs`: its pairs, t ~ U{0..T−1}, noise)
    on the x̂0 that `x0_source` gives for it; every SPM parameter trains."""
    def pair_scores(step: int, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x0_0, x0_1 = x0_source(jobs[step])
        timesteps = torch.tensor(jobs[step].timesteps)
        with autocast():
            return spm_pair_scores(spm, x0_0, x0_1, batch.prompts, timesteps)

    named = [(n, p) for n, p in spm.named_parameters() if p.requires_grad]
    return fit_pairs(spm, named, pair_scores, load_batch, iter(job.indices for job in jobs),
                     learning_rate=cfg.learning_rate, steps=len(jobs), cfg=cfg, tracker=tracker, prefix="spm")


# ----------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_accuracy(spm: StepAwarePreferenceModel, load_batch: PairLoader, jobs: Sequence[X0Job],
                      x0_source: X0Source, *, autocast: AutocastFactory = nullcontext) -> dict[int, float]:
    """Pairwise SPM accuracy (ties excluded) on the x̂0 of fixed-t jobs (`spm_inputs.plan_eval_jobs`), per t.
    The same jobs before and after training mean identical inputs."""
    was_training = spm.training
    spm.eval()
    counts: dict[int, list[int]] = {}
    for job in progress(jobs, desc="train_spm: accuracy", unit="batch"):
        batch = load_batch(job.indices)
        x0_0, x0_1 = x0_source(job)
        timesteps = torch.tensor(job.timesteps)
        with autocast():
            scores_0, scores_1 = spm_pair_scores(spm, x0_0, x0_1, batch.prompts, timesteps)
        c, n = pairwise_correct(scores_0.cpu(), scores_1.cpu(), batch.label_0, batch.label_1)
        tally = counts.setdefault(job.timesteps[0], [0, 0])
        tally[0], tally[1] = tally[0] + c, tally[1] + n
    spm.train(was_training)
    return {t: correct / counted if counted else float("nan") for t, (correct, counted) in counts.items()}


@torch.no_grad()
def backbone_clean_accuracy(spm: StepAwarePreferenceModel, load_batch: PairLoader, indices: Sequence[int], *,
                            batch_size: int, autocast: AutocastFactory = nullcontext) -> float:
    """Pairwise accuracy of the plain backbone on the clean images (the PickScore-analogue number)."""
    was_training = spm.training
    spm.eval()
    correct = counted = 0
    for start in range(0, len(indices), batch_size):
        batch = load_batch(indices[start:start + batch_size])
        with autocast():
            scores_0, scores_1 = backbone_pair_scores(spm, batch)
        c, n = pairwise_correct(scores_0.cpu(), scores_1.cpu(), batch.label_0, batch.label_1)
        correct, counted = correct + c, counted + n
    spm.train(was_training)
    return correct / counted if counted else float("nan")
