"""Opt-in fast scoring (issue 11): a cheaper decoder for the SPM's x̂0 inputs during the SPO rollout.

The published rollout decodes every candidate's x̂0 with the full VAE, only to resize the 512/1024 px image
to the SPM's 224 px: on an H200 that decode is a third of a round. A distilled tiny decoder
(`AutoencoderTiny`, TAESD: `madebyollin/taesd` for SD1.5, `madebyollin/taesdxl` for SDXL) reads the
same scaled latents as the UNet and outputs images in [-1, 1] at the same size for a small fraction of the
FLOPs. The SPM was trained on full-VAE decodes, so its scores move: the change in pairwise accuracy per
timestep and in the trained model is measured (benchmarks/fast_scoring.py), and it is never the default.

Only scoring uses it; training pairs, log-probs and evaluation images are unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from spo.config import ConfigError
from spo.models.diffusion_model import resolve_model_location
from spo.tracking.progress import no_library_bars

DECODER_CLASSES = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
ScoringDecoder = AutoencoderTiny | AutoencoderKL


def _config(location: str) -> dict:
    """config.json of a local dir or a hub id (the hub's is fetched by `load_config`)."""
    path = Path(location)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"train_spo.scoring_decoder: {location} is not a diffusers autoencoder directory "
                             "(no config.json)")
        return json.loads(config_file.read_text())
    return dict(AutoencoderTiny.load_config(location))


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' AutoencoderTiny saves a `block_out_channels` its own loader then warns it ignores, on
    every run; its warnings are silenced for the load (errors still raise)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def upsampling_factor(decoder: ScoringDecoder) -> int:
    """Image pixels per latent pixel along a side."""
    if isinstance(decoder, AutoencoderTiny):
        return decoder.config.upsampling_scaling_factor ** (len(decoder.config.num_decoder_blocks) - 1)
    return 2 ** (len(decoder.config.block_out_channels) - 1)


def load_scoring_decoder(location: str, vae: AutoencoderKL, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> ScoringDecoder:
    """The decoder at `location` (hub id or local dir), checked against the model's own VAE: the same latent
    channels and upsampling, so it reads the UNet's latents and gives images of the VAE's size."""
    location = resolve_model_location(location, "train_spo.scoring_decoder")
    class_name = _config(location).get("_class_name")
    if class_name not in DECODER_CLASSES:
        raise ConfigError(f"train_spo.scoring_decoder: {location} is a {class_name!r}; supported: "
                         f"{', '.join(DECODER_CLASSES)}")
    with no_library_bars(location), _quiet_diffusers():
        decoder = DECODER_CLASSES[class_name].from_pretrained(location, torch_dtype=dtype)
    if decoder.config.latent_channels != vae.config.latent_channels:
        raise ConfigError(f"train_spo.scoring_decoder: {location} reads {decoder.config.latent_channels} latent "
                         f"channels, the model's VAE writes {vae.config.latent_channels}")
    if upsampling_factor(decoder) != upsampling_factor(vae):
        raise ConfigError(f"train_spo.scoring_decoder: {location} upsamples by {upsampling_factor(decoder)}, the "
                         f"model's VAE by {upsampling_factor(vae)}")
    return decoder.requires_grad_(False).eval().to(device)


def tiny_decoder_like(vae: AutoencoderKL, channels: int = 64, blocks_per_level: int = 3) -> AutoencoderTiny:
    """A random-init AutoencoderTiny that reads `vae`'s latents and upsamples as much: TAESD's layout
    (64 channels, 3 blocks per level, the last level 1) with as many levels as the VAE has."""
    levels = len(vae.config.block_out_channels)
    return AutoencoderTiny(latent_channels=vae.config.latent_channels,
                           encoder_block_out_channels=(channels,) * levels,
                           decoder_block_out_channels=(channels,) * levels,
                           num_encoder_blocks=(1,) + (blocks_per_level,) * (levels - 1),
                           num_decoder_blocks=(blocks_per_level,) * (levels - 1) + (1,))
