"""One loader for the text-to-image model: a hub id on a cluster, or a local `save_pretrained` dir.

The digits profile and the tests use local directories written by `save_pretrained`; SD1.5 uses
`stable-diffusion-v1-5/stable-diffusion-v1-5`. Both go through `from_pretrained`, so both exercise the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from spo.tracking.progress import no_library_bars


def resolve_model_location(name: str, what: str) -> str:
    """Return `name` unchanged if it is an existing dir or looks like a hub id; else a MissingPathError
    (a FileNotFoundError that the `spo` command prints on one line, exit 2)."""
    from spo.config import MissingPathError

    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") != 1 or path.exists()
    if looks_local:
        raise MissingPathError(f"{what}: local model directory not found: {name}")
    return name  # hub id "org/name": resolved by from_pretrained (needs the hub or its cache)


@dataclass
class DiffusionModel:
    """The parts of a StableDiffusionPipeline that SPO uses, with the DDIM scheduler of DESIGN 3.2."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states, (B, L, D); the empty prompt gives the CFG negative."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0].to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, h, w)."""
        images = images.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.sample(generator)
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32). Not no_grad: callers choose."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.float().clamp(-1, 1)


def load_diffusion_model(name: str, *, vae: str | None = None, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> DiffusionModel:
    """Load UNet, VAE, text encoder, tokenizer and a DDIM scheduler from a hub id or a local dir."""
    name = resolve_model_location(name, "base model")
    vae_name = resolve_model_location(vae, "vae") if vae else None
    with no_library_bars(name, vae_name):
        model = DiffusionModel(
            unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype),
            vae=(AutoencoderKL.from_pretrained(vae_name, torch_dtype=dtype) if vae_name
                 else AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype)),
            text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(name, subfolder="scheduler"),
        )
    for net in (model.unet, model.vae, model.text_encoder):
        net.requires_grad_(False).eval().to(device)
    return model
