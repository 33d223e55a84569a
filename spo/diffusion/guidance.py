"""Classifier-free guidance: the only place that calls the UNet for denoising.

ε̂ = ε_uncond + s·(ε_cond − ε_uncond), with the unconditional and conditional halves in one batch. The
conditioning objects carry SDXL's pooled text embeddings and time ids, so SD1.5 and SDXL share this code.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from spo.diffusion.conditioning import PromptConditioning


def guided_noise_pred(unet: UNet2DConditionModel, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: PromptConditioning, uncond: PromptConditioning, guidance_scale: float) -> torch.Tensor:
    """latents (N, C, h, w), timesteps (N,) or scalar, cond N rows, uncond N rows or 1 (broadcast)."""
    n = latents.shape[0]
    timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
    uncond = uncond.expand(n)
    if guidance_scale == 1.0:
        return unet(latents, timesteps, **cond.unet_kwargs()).sample
    model_in = torch.cat([latents, latents]).to(unet.dtype)
    both = PromptConditioning.cat([uncond, cond]).to(dtype=unet.dtype)
    out = unet(model_in, torch.cat([timesteps, timesteps]), **both.unet_kwargs()).sample
    noise_uncond, noise_cond = out.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)
