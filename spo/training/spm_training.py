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
from torch import nn

from spo.config import TrainSPMConfig
from spo.diffusion.ddim import predict_x0
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.tracking.progress import progress
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy
from spo.training.distributed import average_gradients, barrier, global_sum

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
    weights: torch.Tensor | None = None  # (B,) loss weights: 1 / num_example_per_prompt (None = equal)


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
def noisy_x0_latents(model: DiffusionModel, images_0: torch.Tensor, images_1: torch.Tensor, prompts: list[str],
                     timesteps: torch.Tensor, guidance_scale: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled one-step x̂0 latents (float32) of both images of each pair, noised at t with the **same** noise.

    The two images of a pair also share the VAE posterior noise (the published code drew it
    independently; the SD VAE's posterior std is tiny), so identical images give identical x̂0.
    At t = 0 this is still the one-step prediction (≈ the clean image), as in training.
    """
    latents_0, latents_1 = _encode_pair(model, images_0, images_1, generator)
    noise = torch.randn(latents_0.shape, generator=generator).to(latents_0.device)
    timesteps = timesteps.to(latents_0.device).long()
    timesteps_2 = torch.cat([timesteps, timesteps])
    latents_t = model.scheduler.add_noise(torch.cat([latents_0, latents_1]), torch.cat([noise, noise]), timesteps_2)
    size = (images_0.shape[-2], images_0.shape[-1])  # SDXL's time ids: the training image size
    cond = model.encode_prompts(list(prompts), size)
    uncond = model.encode_negative(size)
    noise_pred = guided_noise_pred(model.unet, latents_t, timesteps_2, cond.repeat(2), uncond, guidance_scale)
    return predict_x0(model.scheduler, noise_pred.float(), timesteps_2, latents_t.float()).chunk(2)


@torch.no_grad()
def noisy_x0_images(model: DiffusionModel, images_0: torch.Tensor, images_1: torch.Tensor, prompts: list[str],
                    timesteps: torch.Tensor, guidance_scale: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`noisy_x0_latents` decoded as the rollout decodes what the SPM scores (`decode_for_scoring`: the VAE
    unless a fast scoring decoder is set), images in [-1, 1]."""
    x0_0, x0_1 = noisy_x0_latents(model, images_0, images_1, prompts, timesteps, guidance_scale, generator)
    return model.decode_for_scoring(torch.cat([x0_0, x0_1])).chunk(2)


# ----------------------------------------------------------------------------------------------------
# loss, accuracy, labels


def pair_losses(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
                label_1: torch.Tensor) -> torch.Tensor:
    """PickScore's per-pair loss without in-batch negatives: soft-label CE over [s0, s1], (B,).

    Ties add log 0.5, so a perfectly tied pair scores 0 (as in the published criterion).
    """
    log_probs = torch.log_softmax(torch.stack([scores_0, scores_1], dim=-1).float(), dim=-1)  # (B, 2)
    labels = torch.stack([label_0, label_1], dim=-1).to(log_probs)
    loss = -(labels * log_probs).sum(-1)
    return loss + (label_0 == label_1).to(loss) * math.log(0.5)


def spm_loss(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor, label_1: torch.Tensor,
             weights: torch.Tensor | None = None, total_weight: torch.Tensor | float | None = None) -> torch.Tensor:
    """Weighted mean of `pair_losses`: sum(w·l) / total_weight. The published criterion weights each pair
    by 1/num_example_per_prompt (a prompt rated 5 times counts as much as one rated once), normalised over
    the global batch: across processes `total_weight` is the sum of w over all of them (default: this
    batch's sum; no weights: the plain mean)."""
    losses = pair_losses(scores_0, scores_1, label_0, label_1)
    if weights is None:
        weights = torch.ones_like(losses)
    weights = weights.to(losses)
    total = weights.sum() if total_weight is None else total_weight
    return (weights * losses).sum() / total


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
    """AdamW with weight decay on every trainable parameter, as the published trainer (DeepSpeed's
    torch AdamW, one group). Gates, biases and the logit scale decay too: at the published lr the
    shrink is lr·wd·steps = 3e-6 · 0.3 · 8000 = 0.7% over the whole run."""
    named = list(named_params) if named_params is not None else list(model.named_parameters())
    params = [p for _, p in named if p.requires_grad]
    return torch.optim.AdamW([{"params": params, "weight_decay": weight_decay}], lr=learning_rate)


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """DeepSpeed 0.12.3's WarmupDecayLR (warmup_type "log", min lr 0) exactly as the published SPM trainer
    ran it: the LR factor of optimizer step `step` (0-based). DeepSpeed sets the LR for iteration i only
    after optimizer step i and its constructor leaves the optimizer's LR alone, so step 0 runs at the
    full LR and step s >= 1 at gamma(s - 1):
        gamma(i) = log(i + 1) / log(warmup)            for i < warmup    (0 at i = 0: step 1 at LR 0)
        gamma(i) = (total - i) / (total - warmup)       after, floored at 0.
    total_steps is the run's max_steps (accelerate divides the trainer's max_steps x world size by the
    number of processes again)."""
    if step == 0:
        return 1.0
    i = step - 1
    if i < warmup_steps:
        return math.log(i + 1) / math.log(warmup_steps) if warmup_steps > 1 else 1.0
    return max(0.0, (total_steps - i) / max(1.0, total_steps - warmup_steps))


def warmup_decay_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                          total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_decay_factor` as a scheduler stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay_factor(step, warmup_steps, total_steps))


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


@dataclass(frozen=True)
class LoopOptions:
    """How the training loop runs beyond the recipe: checkpoints, and where to resume from."""

    checkpoints: CheckpointPolicy | None = None
    resume: dict | None = None  # a checkpoint's state (CheckpointPolicy.latest) to continue from
    saved_metrics: dict[str, float] | None = None  # measured before training, stored in each checkpoint


def fit_pairs(spm: StepAwarePreferenceModel, named_params: list[tuple[str, nn.Parameter]], pair_scores: PairScorer,
              load_batch: PairLoader, batches: Iterator[list[int]] | Iterator[tuple[int, ...]], *,
              learning_rate: float, steps: int, cfg: TrainSPMConfig, tracker: Tracker, prefix: str,
              options: LoopOptions = LoopOptions()) -> list[float]:
    """`steps` AdamW steps (warmup-decay, clipped) of `spm_loss` on `pair_scores`; logs `{prefix}/…`.
    `pair_scores(step, batch)` scores both images of the step's batch (step counts from 0).

    Data parallel: each process scores its own batch; the loss is normalised by the global weight sum
    and the gradients averaged (spo.training.distributed), so any number of processes takes the same
    step. With `options.resume` the loop continues after the checkpoint's step, skipping the batches
    already seen: the result equals an uninterrupted run."""
    params = [p for _, p in named_params]
    optimizer = make_optimizer(spm, learning_rate, cfg.weight_decay, named_params)
    scheduler = warmup_decay_schedule(optimizer, cfg.warmup_steps, steps)
    losses: list[float] = []
    start = 0
    if options.resume is not None:
        spm.load_state_dict(options.resume["model"])
        optimizer.load_state_dict(options.resume["optimizer"])
        scheduler.load_state_dict(options.resume["scheduler"])
        losses, start = list(options.resume["losses"]), int(options.resume["step"])
    for _ in range(start):
        next(batches)  # the same batches after a resume
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    spm.train()
    bar = progress(range(start + 1, steps + 1), desc=f"train_spm: {prefix}", total=steps, initial=start)
    for step in bar:
        batch = load_batch(next(batches))
        scores_0, scores_1 = pair_scores(step - 1, batch)
        label_0, label_1 = batch.label_0.to(scores_0.device), batch.label_1.to(scores_0.device)
        weights = (batch.weights if batch.weights is not None else torch.ones_like(batch.label_0)).to(scores_0.device)
        total_weight = global_sum(weights.sum().float())
        # x world: the gradient average over processes then gives sum_all(w·l) / sum_all(w)
        loss = spm_loss(scores_0.float(), scores_1.float(), label_0, label_1, weights, total_weight / world)
        loss.backward()
        average_gradients(params)
        lr = scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(params, optimizer, scheduler, cfg.grad_clip)
        losses.append(float(global_sum(loss.detach())) / world)
        logs = {f"{prefix}/loss": losses[-1], f"{prefix}/lr": lr, f"{prefix}/grad_norm": grad_norm}
        accuracy = pairwise_accuracy(scores_0.detach(), scores_1.detach(), label_0, label_1)
        if not math.isnan(accuracy):
            logs[f"{prefix}/accuracy"] = accuracy
        tracker.log_metrics(logs, step=step)
        bar.set_postfix(loss=f"{_recent_mean(losses):.4f}", lr=f"{lr:.1e}", refresh=False)
        if options.checkpoints is not None and options.checkpoints.due(step, steps):
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                options.checkpoints.save(step, {"model": spm.state_dict(), "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict(), "losses": losses,
                                                "metrics": dict(options.saved_metrics or {})})
            barrier()
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
              cfg: TrainSPMConfig, *, tracker: Tracker, autocast: AutocastFactory = nullcontext,
              options: LoopOptions = LoopOptions()) -> list[float]:
    """Phase 2: one step per planned job (`spm_inputs.plan_training_jobs`: its pairs, t ~ U{0..T−1}, noise)
    on the x̂0 that `x0_source` gives for it; every SPM parameter trains."""
    def pair_scores(step: int, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x0_0, x0_1 = x0_source(jobs[step])
        timesteps = torch.tensor(jobs[step].timesteps)
        with autocast():
            return spm_pair_scores(spm, x0_0, x0_1, batch.prompts, timesteps)

    named = [(n, p) for n, p in spm.named_parameters() if p.requires_grad]
    return fit_pairs(spm, named, pair_scores, load_batch, iter(job.indices for job in jobs),
                     learning_rate=cfg.learning_rate, steps=len(jobs), cfg=cfg, tracker=tracker, prefix="spm",
                     options=options)


# ----------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_accuracy(spm: StepAwarePreferenceModel, load_batch: PairLoader, jobs: Sequence[X0Job],
                      x0_source: X0Source, *, autocast: AutocastFactory = nullcontext,
                      timesteps: Sequence[int] | None = None) -> dict[int, float]:
    """Pairwise SPM accuracy (ties excluded) on the x̂0 of fixed-t jobs (`spm_inputs.plan_eval_jobs`), per t.
    The same jobs before and after training mean identical inputs. With several processes each scores
    its share of the jobs and the counts are summed; `timesteps` then lists every t (a process may have
    no job of some t)."""
    was_training = spm.training
    spm.eval()
    keys = sorted(set(timesteps) if timesteps is not None else {job.timesteps[0] for job in jobs})
    counts = torch.zeros(len(keys), 2, dtype=torch.float64)
    for job in progress(jobs, desc="train_spm: accuracy", unit="batch"):
        batch = load_batch(job.indices)
        x0_0, x0_1 = x0_source(job)
        with autocast():
            scores_0, scores_1 = spm_pair_scores(spm, x0_0, x0_1, batch.prompts, torch.tensor(job.timesteps))
        c, n = pairwise_correct(scores_0.cpu(), scores_1.cpu(), batch.label_0, batch.label_1)
        counts[keys.index(job.timesteps[0])] += torch.tensor([c, n], dtype=torch.float64)
    counts = global_sum(counts.to(spm.device)).cpu()
    spm.train(was_training)
    return {t: float(c / n) if n else float("nan") for t, (c, n) in zip(keys, counts.tolist())}


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


def published_pair_credit(scores_0: torch.Tensor, scores_1: torch.Tensor, label_0: torch.Tensor,
                          label_1: torch.Tensor) -> torch.Tensor:
    """The published validation's credit per pair, (s0 > s1)·label_0 + (s0 < s1)·label_1: 1 for a right
    decisive pair, ½ for a tie label (0 if the scores are exactly equal), else 0 — averaged over *all*
    pairs, ties included (ours excludes them)."""
    return ((scores_0 > scores_1).to(torch.float64) * label_0.to(torch.float64)
            + (scores_0 < scores_1).to(torch.float64) * label_1.to(torch.float64))


@torch.no_grad()
def clean_accuracy_metrics(spm: StepAwarePreferenceModel, load_batch: PairLoader, indices: Sequence[int],
                           batch_size: int, autocast: AutocastFactory = nullcontext, *,
                           prefix: str = "") -> dict[str, float]:
    """The SPM at t = 0 on the clean images (no x̂0 step), as the published trainer reports its t = 0
    accuracy: `{prefix}accuracy_clean_t0` (ties excluded, as ours) and `{prefix}accuracy_clean_t0_published`
    (ties as ½). Every process scores every pair (the eval set is small)."""
    was_training = spm.training
    spm.eval()
    correct = counted = 0
    credit: list[torch.Tensor] = []
    for start in range(0, len(indices), batch_size):
        batch = load_batch(indices[start:start + batch_size])
        with autocast():
            scores_0, scores_1 = spm_pair_scores(spm, batch.images_0, batch.images_1, batch.prompts,
                                                 torch.zeros(len(batch.prompts), dtype=torch.long))
        scores_0, scores_1 = scores_0.float().cpu(), scores_1.float().cpu()
        c, n = pairwise_correct(scores_0, scores_1, batch.label_0, batch.label_1)
        correct, counted = correct + c, counted + n
        credit.append(published_pair_credit(scores_0, scores_1, batch.label_0, batch.label_1))
    spm.train(was_training)
    return {f"{prefix}accuracy_clean_t0": correct / counted if counted else float("nan"),
            f"{prefix}accuracy_clean_t0_published": float(torch.cat(credit).mean()) if credit else float("nan")}

