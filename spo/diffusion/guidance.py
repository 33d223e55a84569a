"""Classifier-free guidance: the only place that calls the UNet for denoising.

ε̂ = ε_uncond + s·(ε_cond − ε_uncond), with the unconditional and conditional halves in one batch.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def guided_noise_pred(unet: UNet2DConditionModel, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond_embeds: torch.Tensor, uncond_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """latents (N, C, h, w), timesteps (N,) or scalar, embeds (N, L, D) (uncond may be (1, L, D))."""
    n = latents.shape[0]
    timesteps = timesteps.expand(n) if timesteps.ndim == 0 else timesteps
    uncond_embeds = uncond_embeds.expand(n, -1, -1)
    if guidance_scale == 1.0:
        return unet(latents, timesteps, encoder_hidden_states=cond_embeds).sample
    model_in = torch.cat([latents, latents]).to(unet.dtype)
    out = unet(model_in, torch.cat([timesteps, timesteps]),
               encoder_hidden_states=torch.cat([uncond_embeds, cond_embeds]).to(unet.dtype)).sample
    noise_uncond, noise_cond = out.float().chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)
