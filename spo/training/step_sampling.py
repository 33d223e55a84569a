"""SPO's step-wise sampling: branch k candidates per step, keep (best, worst) pairs (DESIGN 3.2).

Shapes: B prompts, K candidates, latents (C, h, w). Notation as in spo/diffusion/ddim.py.

    steps i < branch_start_step: plain DDIM (η) sampling, no pairs (t > 750 for the SD1.5 recipe)
    steps i >= branch_start_step, from the shared x_t:
        x_{t-1}^k = μ_θ(x_t) + σ_t ε_k                 one UNet call serves all K candidates
        ε̂_k = ε_θ(x_{t-1}^k, t-1)                       one UNet call on B·K candidates ...
        s_k = SPM(decode(x̂_0(x_{t-1}^k)), t-1)          ... scored at the candidate's own timestep
        keep (x_t, x_best, x_worst) if softmax(s_best, s_worst) gap > threshold
        continue from a uniformly random candidate, reusing its ε̂_k for the next step
    after the last step the candidates are x_0 themselves, scored at t = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spo.diffusion.conditioning import PromptConditioning
from spo.diffusion.ddim import ddim_step, predict_x0, previous_timestep
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel

# score_fn(images in [-1, 1] (N, 3, H, W), prompt_index (N,), timesteps (N,)) -> scores (N,)
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepPairs:
    """Kept training pairs; every tensor has the pair dimension N first."""

    latents_t: torch.Tensor  # (N, C, h, w) shared x_t
    latents_win: torch.Tensor  # (N, C, h, w) x_{t-1} of the best candidate
    latents_lose: torch.Tensor  # (N, C, h, w) x_{t-1} of the worst candidate
    timesteps: torch.Tensor  # (N,) t of the transition x_t -> x_{t-1}
    prompt_index: torch.Tensor  # (N,) into the round's prompts

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def select(self, index: torch.Tensor) -> StepPairs:
        return StepPairs(self.latents_t[index], self.latents_win[index], self.latents_lose[index],
                         self.timesteps[index], self.prompt_index[index])


@dataclass
class RolloutStats:
    num_candidates_scored: int = 0
    num_comparisons: int = 0
    num_kept: int = 0
    scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def kept_pair_rate(self) -> float:
        return self.num_kept / max(self.num_comparisons, 1)


@dataclass(frozen=True)
class RolloutSettings:
    num_inference_steps: int
    eta: float
    guidance_scale: float
    num_candidates: int
    branch_start_step: int
    threshold: float


def select_best_worst(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (B, K) -> best idx (B,), worst idx (B,), keep mask (B,): softmax(best, worst) gap > threshold."""
    best = scores.argmax(dim=1)
    worst = scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, best[:, None])[:, 0], scores.gather(1, worst[:, None])[:, 0]], dim=1)
    probs = pair.float().softmax(dim=1)
    keep = (probs[:, 0] - probs[:, 1]) > threshold
    return best, worst, keep


def _score_candidates(model: DiffusionModel, x0_pred: torch.Tensor, prompt_index: torch.Tensor,
                      timesteps: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
    images = model.decode_latents(x0_pred)
    return score_fn(images, prompt_index, timesteps).float()


@torch.no_grad()
def rollout_pairs(model: DiffusionModel, cond: PromptConditioning, uncond: PromptConditioning,
                  settings: RolloutSettings, score_fn: ScoreFn, initial_latents: torch.Tensor,
                  generator: torch.Generator) -> tuple[StepPairs, RolloutStats]:
    """Sample B trajectories with the current UNet and return the kept pairs. cond: B rows, uncond: 1."""
    scheduler, unet = model.scheduler, model.unet
    scheduler.set_timesteps(settings.num_inference_steps)
    timesteps = scheduler.timesteps.to(model.device)
    b, k = initial_latents.shape[0], settings.num_candidates
    prompt_index = torch.arange(b, device=model.device)
    cond_k = cond.repeat_interleave(k)  # B*K rows, candidate-major within each prompt
    latents = initial_latents.float()
    stats, kept = RolloutStats(), []

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(model.device)

    for t in timesteps[: settings.branch_start_step]:
        step = ddim_step(scheduler, guided_noise_pred(unet, latents, t, cond, uncond, settings.guidance_scale),
                         t, latents, settings.eta)
        latents = step.mean + step.sigma * noise(latents.shape)

    noise_pred = guided_noise_pred(unet, latents, timesteps[settings.branch_start_step], cond, uncond,
                                   settings.guidance_scale)
    for t in timesteps[settings.branch_start_step:]:
        step = ddim_step(scheduler, noise_pred, t, latents, settings.eta)  # shared mean for the K candidates
        candidates = step.mean[:, None] + step.sigma[:, None] * noise((b, k, *latents.shape[1:]))  # (B, K, ...)
        flat = candidates.flatten(0, 1)
        t_prev = previous_timestep(scheduler, t)
        if t_prev >= 0:
            cand_noise = guided_noise_pred(unet, flat, t_prev, cond_k, uncond, settings.guidance_scale)
            x0_pred, score_t = predict_x0(scheduler, cand_noise, t_prev, flat), t_prev
        else:
            cand_noise, x0_pred, score_t = None, flat, torch.zeros_like(t)
        scores = _score_candidates(model, x0_pred, prompt_index.repeat_interleave(k),
                                   score_t.expand(b * k), score_fn).view(b, k)
        best, worst, keep = select_best_worst(scores, settings.threshold)
        rows = keep.nonzero()[:, 0]
        kept.append(StepPairs(latents[rows], candidates[rows, best[rows]], candidates[rows, worst[rows]],
                              t.expand(rows.numel()).clone(), prompt_index[rows]))
        stats.num_candidates_scored += b * k
        stats.num_comparisons += b
        stats.num_kept += rows.numel()
        stats.scores.append(scores.flatten().cpu())
        choice = torch.randint(k, (b,), generator=generator).to(model.device)  # random continuation
        latents = candidates[prompt_index, choice]
        if cand_noise is not None:
            noise_pred = cand_noise.view(b, k, *latents.shape[1:])[prompt_index, choice]

    pairs = StepPairs(*(torch.cat([getattr(p, f) for p in kept]) for f in
                        ("latents_t", "latents_win", "latents_lose", "timesteps", "prompt_index")))
    return pairs, stats
