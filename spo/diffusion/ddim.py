"""DDIM step with log-probability (Song et al. 2021, eq. 12; SPO eq. 4).

Notation map (paper -> code), all per sample, shapes (N, C, h, w) unless noted:
    x_t                    latents_t
    x_{t-1}                latents_prev
    ε̂_θ(x_t, t, c)         noise_pred (already classifier-free guided)
    ᾱ_t, ᾱ_{t-1}           alpha_bar_t, alpha_bar_prev   (N, 1, 1, 1)
    x̂_0                    x0_pred
    σ_t = η·sqrt(var_t)    sigma_t                        (N, 1, 1, 1)
    μ_θ(x_t)               mean

The final step (prev_t < 0) uses the scheduler's `final_alpha_cumprod` (1.0 when `set_alpha_to_one`),
exactly as `diffusers.DDIMScheduler.step`; the published code's equivalent branch was dead.
Only epsilon prediction is supported (SD1.5 and SDXL base both predict epsilon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass
class DDIMStep:
    mean: torch.Tensor  # μ_θ(x_t)
    sigma: torch.Tensor  # σ_t, (N, 1, 1, 1)
    x0_pred: torch.Tensor  # x̂_0


def previous_timestep(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """t - T/S: the DDIM predecessor of each timestep (negative after the last step)."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return timesteps - step


def _alpha_bar(scheduler: DDIMScheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod.to(like.device, torch.float64)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float64, device=like.device)
    t = timesteps.to(like.device).long()
    out = torch.where(t >= 0, alphas[t.clamp(min=0)], final)
    return out.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def predict_x0(scheduler: DDIMScheduler, noise_pred: torch.Tensor, timesteps: torch.Tensor,
               latents_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − sqrt(1−ᾱ_t)·ε̂) / sqrt(ᾱ_t), clipped like diffusers when the config asks."""
    timesteps = timesteps.expand(latents_t.shape[0]) if timesteps.ndim == 0 else timesteps
    alpha_bar_t = _alpha_bar(scheduler, timesteps, latents_t)
    x0_pred = (latents_t - (1 - alpha_bar_t).sqrt() * noise_pred) / alpha_bar_t.sqrt()
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0_pred = x0_pred.clamp(-r, r)
    return x0_pred


def ddim_step(scheduler: DDIMScheduler, noise_pred: torch.Tensor, timesteps: torch.Tensor,
              latents_t: torch.Tensor, eta: float) -> DDIMStep:
    """Mean and σ of p_θ(x_{t-1} | x_t) for a batch; `timesteps` is (N,) (may differ per sample)."""
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"scheduler prediction_type {scheduler.config.prediction_type!r}: only 'epsilon' is supported")
    timesteps = timesteps.expand(latents_t.shape[0]) if timesteps.ndim == 0 else timesteps
    alpha_bar_t = _alpha_bar(scheduler, timesteps, latents_t)
    alpha_bar_prev = _alpha_bar(scheduler, previous_timestep(scheduler, timesteps), latents_t)
    x0_pred = predict_x0(scheduler, noise_pred, timesteps, latents_t)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * noise_pred
    mean = alpha_bar_prev.sqrt() * x0_pred + direction
    return DDIMStep(mean=mean, sigma=sigma, x0_pred=x0_pred)


def gaussian_log_prob(latents_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(x_{t-1}; μ, σ²) averaged over latent elements -> (N,). The mean fixes β's scale (DESIGN 3.2)."""
    log_density = (-((latents_prev.detach() - mean) ** 2) / (2 * sigma**2)
                   - torch.log(sigma) - 0.5 * math.log(2 * math.pi))
    return log_density.mean(dim=tuple(range(1, latents_prev.ndim)))
