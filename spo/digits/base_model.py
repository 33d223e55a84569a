"""The digits world's base model: a tiny text-to-image latent diffusion model in the exact
`StableDiffusionPipeline` format (AutoencoderKL, UNet2DConditionModel, CLIPTextModel + CLIPTokenizer,
DDIMScheduler configured like SD1.5), trained here so SPO starts from a real, aligned model.

Training follows Stable Diffusion: the text encoder is a contrastively pre-trained CLIP text tower
(here the backbone's, as SD1.5 uses CLIP ViT-L's), frozen; the VAE is fitted first (reconstruction + a
small KL term); then the UNet learns ε-prediction with 10% of captions dropped to "" (CFG's negative).
The UNet loss uses min-SNR-5 weighting (Hang et al. 2023): it stresses the high-noise steps where the
caption decides the digit (measured: 1,000 steps at batch 64 gave 100% alignment with it, 58% without).
The frozen pre-trained text tower halves the steps again (600 steps: ~100%; a text encoder trained from
scratch with the UNet was still at chance after 600).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from transformers import CLIPTextModel, CLIPTokenizer

from spo.digits.captions import TRAIN_TEMPLATES, make_caption
from spo.tracking.progress import no_library_bars

LATENT_CHANNELS = 4
KL_WEIGHT = 1.0e-4  # per-pixel KL weight: keeps the latent posterior tight without blurring
CAPTION_DROPOUT = 0.1  # fraction of captions replaced by "" so the model learns the CFG negative
MIN_SNR_GAMMA = 5.0  # loss weight min(SNR, γ) / SNR
VAE_BATCH_DIVISOR = 2  # the VAE works at 16x16, the UNet at 8x8: half-size VAE batches, for more steps per second


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    seed: int


def build_vae(image_size: int) -> AutoencoderKL:
    """0.66 M parameters: 16x16x3 -> 8x8x4 (two blocks, one downsampling)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                         sample_size=image_size)


def build_unet(latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """0.79 M parameters: blocks 32/64, cross-attention at the 8x8 level (as SD1.5's outer blocks)."""
    return UNet2DConditionModel(sample_size=latent_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def build_scheduler() -> DDIMScheduler:
    """DDIM exactly as SD1.5's scheduler config."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type="epsilon")


def _warmup_cosine(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay to 0 (diffusers' "cosine"; step it per step)."""
    return get_scheduler("cosine", optimizer, num_warmup_steps=max(1, total // 20), num_training_steps=total)


def train_vae(vae: AutoencoderKL, images: torch.Tensor, settings: TrainSettings) -> float:
    """Fit the VAE on `images` ([-1, 1]); set its scaling factor to 1/std of the latents. Returns the MSE."""
    generator = torch.Generator().manual_seed(settings.seed)
    batch_size = max(1, settings.batch_size // VAE_BATCH_DIVISOR)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, settings.steps)
    vae.train()
    for step in range(settings.steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl_per_pixel = posterior.kl().mean() / batch[0].numel()
        loss = torch.nn.functional.mse_loss(recon, batch) + KL_WEIGHT * kl_per_pixel
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mse = torch.nn.functional.mse_loss(vae.decode(posterior.mode()).sample.clamp(-1, 1), images).item()
        vae.register_to_config(scaling_factor=float(1.0 / posterior.mode().std()))
    return mse


def caption_ids_by_digit(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every train caption, (10, T, L), and of the empty caption, (L,)."""
    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    per_digit = torch.stack([ids([make_caption(t, d) for t in TRAIN_TEMPLATES]) for d in range(10)])
    return per_digit, ids([""])[0]


@torch.no_grad()
def caption_states_by_digit(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen text-encoder states of every train caption, (10, T, L, D), and of "", (L, D)."""
    per_digit_ids, empty_ids = caption_ids_by_digit(tokenizer)
    states = text_encoder(per_digit_ids.flatten(0, 1))[0]
    return states.view(*per_digit_ids.shape, -1), text_encoder(empty_ids[None])[0][0]


def train_denoiser(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                   scheduler: DDIMScheduler, vae: AutoencoderKL, images: torch.Tensor, digits: torch.Tensor,
                   settings: TrainSettings) -> float:
    """min-SNR-weighted ε-prediction training of the UNet (text encoder frozen); returns the last 50 losses' mean."""
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
    scaling = vae.config.scaling_factor
    caption_states, empty_states = caption_states_by_digit(text_encoder.eval(), tokenizer)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = _warmup_cosine(optimizer, settings.steps)
    alphas_cumprod = scheduler.alphas_cumprod
    unet.train()
    recent: list[float] = []
    for step in range(settings.steps):
        index = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        latents = latents * scaling
        template = torch.randint(0, caption_states.shape[1], (settings.batch_size,), generator=generator)
        dropped = torch.rand(settings.batch_size, generator=generator) < CAPTION_DROPOUT
        states = torch.where(dropped[:, None, None], empty_states[None], caption_states[digits[index], template])
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        noise_pred = unet(noisy, timesteps, encoder_hidden_states=states).sample
        snr = alpha_bar.flatten() / (1 - alpha_bar.flatten())
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min(SNR, γ) / SNR: the ε-prediction form
        loss = (weight * ((noise_pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
    unet.eval()
    return sum(recent) / max(1, len(recent))


def save_base_model(out_dir: Path, *, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                    tokenizer: CLIPTokenizer, scheduler: DDIMScheduler) -> Path:
    """Write a StableDiffusionPipeline directory (no safety checker), loadable by `from_pretrained`."""
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    with no_library_bars():
        pipeline.save_pretrained(out_dir)
    return out_dir


def fit_vae(image_size: int, settings: TrainSettings) -> tuple[AutoencoderKL, float]:
    """Build and fit the VAE on the digits at `image_size` (needs nothing else, so it can train in a worker
    process beside the backbone). Returns the VAE and its reconstruction MSE."""
    from spo.digits.images import load_digit_images

    images, _ = load_digit_images(image_size)
    torch.manual_seed(settings.seed)
    vae = build_vae(image_size)
    return vae, train_vae(vae, images, settings)


def train_base_model(out_dir: Path, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vae: AutoencoderKL,
                     images: torch.Tensor, digits: torch.Tensor, *, unet_settings: TrainSettings) -> dict[str, float]:
    """Train the UNet under the given (pre-trained, frozen) text encoder and fitted VAE; save the pipeline."""
    torch.manual_seed(unet_settings.seed)
    latent_size = images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(latent_size, text_encoder.config.hidden_size)
    scheduler = build_scheduler()
    text_encoder.requires_grad_(False)
    loss = train_denoiser(unet, text_encoder, tokenizer, scheduler, vae, images, digits, unet_settings)
    save_base_model(out_dir, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    return {"unet_final_loss": loss, "vae_params_m": sum(p.numel() for p in vae.parameters()) / 1e6,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}
