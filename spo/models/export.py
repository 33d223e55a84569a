"""`spo export --merged`: the base pipeline with our fine-tune baked in, as one diffusers pipeline dir.

For tools that take a checkpoint, not an adapter: the LoRA is fused into the UNet's weights
(W <- W + alpha/r * B A, what `load_lora_weights` + `fuse_lora` compute), or the fully fine-tuned UNet
replaces the base one; optionally the VAE is swapped (SDXL: madebyollin/sdxl-vae-fp16-fix). The result
loads with `DiffusionPipeline.from_pretrained(out_dir)` and with `load_diffusion_model(out_dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from spo.atomic_write import atomic_dir
from spo.config import ConfigError
from spo.models.diffusion_model import pipeline_architecture, resolve_model_location
from spo.models.lora import LORA_WEIGHTS_FILE, full_unet_dir, load_full_unet, lora_weights_file
from spo.tracking.progress import no_library_bars


def _check_inputs(base: str, out_dir: Path, lora_dir: Path | None, unet_dir: Path | None) -> None:
    """Every input exists, before the (slow) base model loads; exactly one fine-tune; out_dir is not the base."""
    if (lora_dir is None) == (unet_dir is None):
        raise ConfigError("export: give exactly one of a LoRA dir (--lora) or a full UNet dir (--unet)")
    if lora_dir is not None:
        lora_weights_file(lora_dir)
    else:
        full_unet_dir(unet_dir)
    if Path(base).is_dir() and Path(base).resolve() == Path(out_dir).resolve():
        raise ConfigError(f"export: the output dir {out_dir} is the base model's dir; choose another")


def _fuse_lora(pipe: DiffusionPipeline, lora_dir: Path) -> None:
    """Bake the adapter into the UNet's weights and drop the LoRA layers (save_pretrained then writes plain
    weights; the rank/alpha scale comes from the adapter file's metadata)."""
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS_FILE)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()


def export_merged(base_model: str, out_dir: Path, *, lora_dir: Path | None = None, unet_dir: Path | None = None,
                  vae: str | None = None) -> Path:
    """Write `base_model` (a local pipeline dir or hub id, SD1.5 or SDXL) with the LoRA of `lora_dir` fused
    (or the UNet of `unet_dir`, as spo.models.lora.load_full_unet finds it) and the VAE `vae` (a bare
    AutoencoderKL dir or hub id; None keeps the base's) to `out_dir`, whole or not at all, in float32
    safetensors. Returns out_dir."""
    out_dir = Path(out_dir)
    base = resolve_model_location(base_model, "base model")
    vae_location = resolve_model_location(vae, "vae") if vae else None
    _check_inputs(base, out_dir, lora_dir, unet_dir)
    pipeline_architecture(base)  # a clear error for anything but an SD1.5 / SDXL pipeline
    replaced = {}
    if vae_location:
        replaced["vae"] = AutoencoderKL.from_pretrained(vae_location, dtype=torch.float32)
    if unet_dir is not None:
        replaced["unet"] = load_full_unet(unet_dir)
    with no_library_bars(base, vae_location):
        pipe = DiffusionPipeline.from_pretrained(base, dtype=torch.float32, **replaced)
        if lora_dir is not None:
            _fuse_lora(pipe, lora_dir)
        with atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir
