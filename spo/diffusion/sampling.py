"""Plain DDIM sampling with per-sample seeds for the initial noise.

With η = 0 (evaluation) a sample depends only on its own (prompt, seed), not on its batch-mates. With
η > 0 the per-step noise comes from one generator seeded by the batch's seeds, so a sample is
reproducible for a fixed batch but changes if the batch is composed differently (known limitation).
"""

from __future__ import annotations

import torch

from spo.diffusion.ddim import ddim_step
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise; row i depends only on seeds[i]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def latent_shape(model: DiffusionModel, resolution: int) -> tuple[int, int, int]:
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return (model.unet.config.in_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def sample_images(model: DiffusionModel, prompts: list[str], seeds: list[int], *, resolution: int,
                  num_inference_steps: int = 20, guidance_scale: float = 5.0, eta: float = 0.0) -> torch.Tensor:
    """Generate one image per (prompt, seed); returns images in [-1, 1], (B, 3, H, W), float32."""
    scheduler = model.scheduler
    scheduler.set_timesteps(num_inference_steps)
    cond = model.encode_prompts(prompts, resolution)
    uncond = model.encode_negative(resolution)
    latents = seeded_noise(latent_shape(model, resolution), seeds, model.device) * scheduler.init_noise_sigma
    noise_gen = torch.Generator().manual_seed(int(sum(seeds)) + 1)
    for t in scheduler.timesteps:
        noise_pred = guided_noise_pred(model.unet, latents, t.to(model.device), cond, uncond, guidance_scale)
        step = ddim_step(scheduler, noise_pred, t.to(model.device), latents.float(), eta)
        latents = step.mean
        if eta > 0:
            latents = latents + step.sigma * torch.randn(latents.shape, generator=noise_gen).to(latents.device)
    return model.decode_latents(latents)
