"""Tiny random-init stand-ins of SD1.5, SDXL, the SDXL fp16-fix VAE and PickScore (DESIGN 2).

Each is the real class with the real config *shape* (block types, cross-attention wiring, SDXL's
`text_time` conditioning and two text encoders, CLIP ViT + laion's processor, the published scheduler
configs verbatim) at toy width, so a real profile takes every code path a cluster run takes, on a CPU,
in seconds. Weights are seeded random: outputs are noise, and only shapes and plumbing are meaningful.
Images are 64 px (8x8x4 latents: the VAEs downsample by 8 as the real ones do).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from spo.standins.pickapic_mirror import STYLES, SUBJECTS
from spo.standins.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer, prompt_words

IMAGE_SIZE = 64
LATENT_SIZE = IMAGE_SIZE // 8
SD15_TEXT_HIDDEN = 32  # real: 768
SDXL_TEXT_HIDDEN = 32  # text_encoder, real: 768
SDXL_TEXT_2_HIDDEN = 64  # text_encoder_2, real: 1280
SDXL_TEXT_2_PROJECTION = 64  # real: 1280
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim, real: 256
PICKSCORE_LOGIT_SCALE = math.log(100.0)  # PickScore_v1's trained logit_scale (4.6052): its scores are ~20

# stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, verbatim.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json (PickScore's processor), in transformers' form.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PICKSCORE_PROCESSOR = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                       "resample": 3, "do_resize": True, "do_center_crop": True, "do_normalize": True,
                       "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
                       "image_mean": CLIP_MEAN, "image_std": CLIP_STD}


def _words() -> list[str]:
    return prompt_words([*SUBJECTS, *STYLES])


def _tokenizer(*, pad_token: str | None = None) -> CLIPTokenizer:
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return build_clip_tokenizer(_words(), **kwargs)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, *, hidden_act: str = "quick_gelu",
                 projection_dim: int | None = None) -> CLIPTextConfig:
    """A 2-layer CLIP text tower whose special ids match `tokenizer` (the pooled output finds EOS by id)."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MODEL_MAX_LENGTH,
                          hidden_act=hidden_act, projection_dim=projection_dim or hidden,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _vae(*, scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    """SD's AutoencoderKL shape (4 encoder/decoder blocks: 8x down, 4 latent channels) at toy width."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)


def _write_scheduler_config(pipeline_dir: Path, config: dict) -> None:
    """Replace what save_pretrained wrote with the published file, so loaders meet exactly what the hub serves."""
    (pipeline_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_sd15(out_dir: Path, seed: int = 0) -> Path:
    """A `StableDiffusionPipeline` dir shaped like stable-diffusion-v1-5 (PNDM scheduler config, no safety checker)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, SD15_TEXT_HIDDEN))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD15_TEXT_HIDDEN)
    pipe = StableDiffusionPipeline(
        vae=_vae(scaling_factor=0.18215, force_upcast=True), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_scheduler_config(out_dir, SD15_SCHEDULER_CONFIG)
    return out_dir


def _sdxl_unet() -> UNet2DConditionModel:
    """SDXL base's UNet shape: 3 levels (no attention at the top), text_time added conditioning, linear
    projections, transformer depth growing with depth (real: 1, 2, 10)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8, attention_head_dim=(2, 4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=SDXL_TEXT_HIDDEN + SDXL_TEXT_2_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_2_PROJECTION)


def build_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """A `StableDiffusionXLPipeline` dir shaped like stable-diffusion-xl-base-1.0 (Euler scheduler config,
    force_zeros_for_empty_prompt, tokenizer_2 padding with "!")."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer(pad_token="!")
    text_encoder = CLIPTextModel(_text_config(tokenizer, SDXL_TEXT_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, SDXL_TEXT_2_HIDDEN, hidden_act="gelu", projection_dim=SDXL_TEXT_2_PROJECTION))
    pipe = StableDiffusionXLPipeline(
        vae=_vae(scaling_factor=0.13025, force_upcast=True), text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=_sdxl_unet(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _write_scheduler_config(out_dir, SDXL_SCHEDULER_CONFIG)
    return out_dir


def build_sdxl_fp16_fix_vae(out_dir: Path, seed: int = 0) -> Path:
    """An AutoencoderKL dir (no subfolder) like madebyollin/sdxl-vae-fp16-fix: SDXL's VAE shape and scaling,
    force_upcast False (the fix makes fp16 decoding safe)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    _vae(scaling_factor=0.13025, force_upcast=False).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_taesd(out_dir: Path, seed: int = 0) -> Path:
    """An AutoencoderTiny dir like madebyollin/taesd and taesdxl (one layout serves both: 4 latent channels,
    8x up, scaling factor 1 so it reads the UNet's scaled latents) at toy width: the opt-in scoring decoder."""
    from spo.models.scoring_decoder import tiny_decoder_like

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tiny_decoder_like(_vae(scaling_factor=0.18215, force_upcast=False), channels=8).save_pretrained(
        out_dir, safe_serialization=True)
    return out_dir


def build_pickscore(out_dir: Path, seed: int = 0) -> Path:
    """A `CLIPModel` + `CLIPProcessor` dir like yuvalkirstain/PickScore_v1 with laion's ViT-H processor:
    a 224 px ViT (patch 32 to stay tiny; real: ViT-H/14), the trained logit scale, CLIP mean/std, bicubic."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(pad_token="!")
    text = _text_config(tokenizer, 32, hidden_act="gelu").to_dict()
    vision = {"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": "gelu"}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(PICKSCORE_LOGIT_SCALE)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**PICKSCORE_PROCESSOR), tokenizer=tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir

