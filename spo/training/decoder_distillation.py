"""Distil a tiny scoring decoder (AutoencoderTiny) from a model's VAE, on the latents the SPM is shown.

TAESD (`madebyollin/taesd`, `taesdxl`) is the tiny decoder of the real VAEs; the digits VAE, trained by
`prepare`, has none, so the opt-in fast scoring path (spo.models.scoring_decoder) is measured on digits
with one distilled here. The decoder learns to reproduce the VAE's decode of one-step x̂0 latents of the
prepared training images at t ~ U{0..T-1}: the inputs the rollout scores, clean (t ≈ 0) and blurred
(high t) alike. Loss: L1 + MSE in pixel space (TAESD adds adversarial and perceptual terms; on 16 px digits
the pixel losses suffice). Only the decoder half is trained; the encoder is never used for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config
from spo.models.diffusion_model import DiffusionModel
from spo.models.scoring_decoder import tiny_decoder_like
from spo.tracking.progress import progress
from spo.training.spm_training import PairLoader, batch_indices, noisy_x0_latents, sample_timesteps


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 1500
    batch_size: int = 32  # pairs: both images of each, so 2x images per step
    learning_rate: float = 1e-3
    guidance_scale: float = 5.0  # the rollout's CFG, so x̂0 looks like what is scored
    channels: int = 64  # TAESD's width
    seed: int = 0


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(images.float(), reference.float()).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(4.0 / mse)).item()


def x0_batch(model: DiffusionModel, load_batch: PairLoader, indices: list[int], generator: torch.Generator,
             guidance_scale: float, timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0 latents, the VAE's decode of them) for the pairs `indices`, t uniform unless given."""
    batch = load_batch(indices)
    if timesteps is None:
        timesteps = sample_timesteps(len(indices), model.scheduler.config.num_train_timesteps, generator)
    latents = torch.cat(noisy_x0_latents(model, batch.images_0, batch.images_1, batch.prompts, timesteps,
                                         guidance_scale, generator))
    with torch.no_grad():
        return latents, model.decode_latents(latents)


def distill_tiny_decoder(model: DiffusionModel, load_batch: PairLoader, train_indices: list[int],
                         settings: DistillSettings) -> tuple[AutoencoderTiny, list[float]]:
    """A tiny decoder trained to match `model.decode_latents` on x̂0 latents; returns it and the losses."""
    torch.manual_seed(settings.seed)
    decoder = tiny_decoder_like(model.vae, channels=settings.channels).to(model.device)
    decoder.encoder.requires_grad_(False)
    params = list(decoder.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = batch_indices(train_indices, settings.batch_size, generator)
    losses = []
    for _ in progress(range(settings.steps), desc="distill decoder", unit="step"):
        latents, target = x0_batch(model, load_batch, next(batches), generator, settings.guidance_scale)
        images = decoder.decode(latents.to(decoder.dtype)).sample.float()
        loss = F.l1_loss(images, target) + F.mse_loss(images, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return decoder.eval().requires_grad_(False), losses


@torch.no_grad()
def decoder_fidelity(model: DiffusionModel, decoder: AutoencoderTiny, load_batch: PairLoader,
                     indices: list[int], timesteps: list[int], guidance_scale: float, seed: int) -> dict[int, float]:
    """PSNR (dB) of the tiny decoder's images against the VAE's on held-out x̂0 latents, per t."""
    out = {}
    for t in timesteps:
        generator = torch.Generator().manual_seed(seed)
        latents, target = x0_batch(model, load_batch, list(indices), generator, guidance_scale,
                                   torch.full((len(indices),), int(t)))
        out[int(t)] = psnr(decoder.decode(latents.to(decoder.dtype)).sample.float().clamp(-1, 1), target)
    return out


def save_decoder(decoder: AutoencoderTiny, out_dir: Path, report: dict) -> None:
    """`save_pretrained` (so `train_spo.scoring_decoder: OUT` loads it) plus distillation.json, atomically."""
    with atomic_dir(out_dir) as tmp:
        decoder.save_pretrained(tmp)
        write_json(tmp / "distillation.json", report)


def distill_for_config(cfg: Config, prepared_dir: Path, out_dir: Path, settings: DistillSettings,
                       fidelity_pairs: int = 64) -> dict:
    """`spo distill-decoder`: distil from the config's base model on its prepared training pairs; write the
    decoder and a report (loss, PSNR per train_spm eval timestep on held-out pairs) to `out_dir`."""
    from spo.data.model_locations import base_model_location
    from spo.data.prepared_layout import PAIRS_DIR
    from spo.models.diffusion_model import load_diffusion_model
    from spo.training.spm_inputs import PairsSpec, TrainingPairs, pair_loader

    pairs = TrainingPairs(PairsSpec(str(prepared_dir / PAIRS_DIR), None, cfg.seed))
    load_batch = pair_loader(pairs, cfg.model.resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_diffusion_model(base_model_location(cfg, prepared_dir), vae=cfg.model.vae, device=device)
    decoder, losses = distill_tiny_decoder(model, load_batch, pairs.train_indices, settings)
    held_out = pairs.eval_indices[:fidelity_pairs]
    fidelity = decoder_fidelity(model, decoder, load_batch, held_out, list(cfg.train_spm.eval_timesteps),
                                settings.guidance_scale, settings.seed + 1)
    tail = losses[-50:]
    report = {"settings": vars(settings), "base_model": base_model_location(cfg, prepared_dir),
              "final_loss": sum(tail) / len(tail), "psnr_db_vs_vae": {f"t{t}": v for t, v in fidelity.items()},
              "held_out_pairs": len(held_out),
              "parameters": {"decoder": sum(p.numel() for p in decoder.decoder.parameters()),
                             "vae_decoder": sum(p.numel() for p in model.vae.decoder.parameters())
                             + sum(p.numel() for p in model.vae.post_quant_conv.parameters())}}
    save_decoder(decoder.cpu(), out_dir, report)
    return report
