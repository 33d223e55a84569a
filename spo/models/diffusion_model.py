"""One loader for the text-to-image model (SD1.5 or SDXL): a hub id on a cluster, or a local `save_pretrained` dir.

The digits profile and the tests use local directories written by `save_pretrained`; SD1.5 uses
`stable-diffusion-v1-5/stable-diffusion-v1-5`, SDXL `stabilityai/stable-diffusion-xl-base-1.0`. All go through
`from_pretrained`, so all exercise the same code. The architecture is read from `model_index.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from spo.diffusion.conditioning import PromptConditioning, sdxl_time_ids
from spo.tracking.progress import no_library_bars

SD15, SDXL = "sd15", "sdxl"
ARCHITECTURES = {"StableDiffusionPipeline": SD15, "StableDiffusionXLPipeline": SDXL}  # model_index _class_name
Resolution = int | tuple[int, int] | None


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
    """The parts of a StableDiffusion(XL)Pipeline that SPO uses, with the DDIM scheduler of DESIGN 3.2.

    SDXL adds a second text encoder (with projection) and its tokenizer; `force_zeros_for_empty_prompt`
    is the pipeline's rule that the CFG negative of an empty prompt is all zeros.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    architecture: str = SD15
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    # opt-in fast scoring: what decodes x̂0 for the SPM (an AutoencoderTiny, spo.models.scoring_decoder);
    # None = the VAE itself, as published
    scoring_decoder: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def default_resolution(self) -> int:
        """The pipelines' default image size: UNet sample size × VAE downsampling (SDXL 1024, SD1.5 512)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: Resolution = None) -> PromptConditioning:
        """Prompt conditioning, N = len(prompts) rows. `resolution` (H = W, or (H, W); default the model's)
        sets SDXL's time ids; SD1.5 ignores it."""
        if self.architecture != SDXL:
            return PromptConditioning(self._hidden_states(self.tokenizer, self.text_encoder, prompts))
        hidden, pooled = self._sdxl_text(prompts)
        size = _size(resolution if resolution is not None else self.default_resolution)
        return PromptConditioning(hidden, pooled, sdxl_time_ids(size, len(prompts), hidden.dtype, hidden.device))

    @torch.no_grad()
    def encode_negative(self, resolution: Resolution = None) -> PromptConditioning:
        """The 1-row CFG negative: the encoded "" (SD1.5), or zeros where the SDXL pipeline zeroes an absent
        negative prompt (`force_zeros_for_empty_prompt`); time ids stay those of the image size."""
        empty = self.encode_prompts([""], resolution)
        if not (empty.is_sdxl and self.force_zeros_for_empty_prompt):
            return empty
        return PromptConditioning(torch.zeros_like(empty.hidden_states), torch.zeros_like(empty.pooled),
                                  empty.time_ids)

    def _hidden_states(self, tokenizer: CLIPTokenizer, encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
        """SD1.5: the text encoder's last hidden states, (N, L, D), in the UNet's dtype."""
        return encoder(_token_ids(tokenizer, prompts, encoder.device))[0].to(self.unet.dtype)

    def _sdxl_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `StableDiffusionXLPipeline.encode_prompt` (clip_skip None): both encoders' penultimate hidden
        states side by side, (N, L, D1 + D2), and text_encoder_2's projected pooled output, (N, P)."""
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1).to(self.unet.dtype), out.text_embeds.to(self.unet.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, C, h, w), in the VAE's dtype."""
        images = images.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.sample(generator)
        return latents * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (any dtype) -> images in [-1, 1] (float32). Not no_grad: callers choose."""
        return _decode(self.vae, latents)

    def to_memory_format(self, memory_format: torch.memory_format) -> None:
        """UNet, VAE and scoring decoder in `memory_format`. Channels-last is the same maths, in the layout
        CUDA's convolution kernels (cuDNN NHWC, tensor cores) run fastest in."""
        for net in (self.unet, self.vae, self.scoring_decoder):
            if net is not None:
                net.to(memory_format=memory_format)

    def decode_for_scoring(self, latents: torch.Tensor) -> torch.Tensor:
        """The images the SPM scores: `decode_latents`, or the opt-in `scoring_decoder`'s decode of the same
        scaled latents (an AutoencoderTiny's scaling factor is 1: it reads them directly)."""
        return self.decode_latents(latents) if self.scoring_decoder is None else _decode(self.scoring_decoder, latents)


def _decode(decoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    latents = latents.to(decoder.dtype) / decoder.config.scaling_factor
    return decoder.decode(latents).sample.float().clamp(-1, 1)


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Padded to the tokenizer's max length and truncated, as the pipelines tokenize."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return tokens.input_ids.to(device)


def pipeline_architecture(name: str) -> tuple[str, dict]:
    """(SD15 or SDXL, model_index.json) of a local pipeline dir or hub id; a clear error for anything else."""
    from diffusers import DiffusionPipeline

    if Path(name).is_dir():
        index_file = Path(name) / "model_index.json"
        if not index_file.is_file():
            raise ValueError(f"base model: {name} is not a diffusers pipeline directory (no model_index.json)")
        index = json.loads(index_file.read_text())
    else:
        index = DiffusionPipeline.load_config(name)  # hub id: model_index.json via the hub or its cache
    class_name = index.get("_class_name")
    if class_name not in ARCHITECTURES:
        raise ValueError(f"base model: {name} is a {class_name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[class_name], dict(index)


def _vae_dtype(architecture: str, vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """SDXL's original VAE overflows to NaN in fp16 (config `force_upcast`): keep it in float32 there, as the
    SDXL pipeline upcasts it; the fp16-fix VAE (force_upcast False) and bf16 run as asked. The SD1.5
    pipeline ignores force_upcast, and so do we."""
    upcast = architecture == SDXL and dtype == torch.float16 and vae_config.get("force_upcast", True)
    return torch.float32 if upcast else dtype


def _load_vae(name: str, vae_name: str | None, architecture: str, dtype: torch.dtype) -> AutoencoderKL:
    """The pipeline's VAE, or a replacement (a bare AutoencoderKL dir or hub id), in `_vae_dtype`."""
    location, subfolder = (vae_name, None) if vae_name else (name, "vae")
    vae_dtype = _vae_dtype(architecture, AutoencoderKL.load_config(location, subfolder=subfolder), dtype)
    return AutoencoderKL.from_pretrained(location, subfolder=subfolder, torch_dtype=vae_dtype)


def _sdxl_parts(name: str, index: dict, dtype: torch.dtype) -> dict[str, object]:
    """SDXL's second text encoder and tokenizer, and its empty-negative rule (the pipeline's default: True)."""
    return {"text_encoder_2": CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2",
                                                                          torch_dtype=dtype),
            "tokenizer_2": CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}


def load_diffusion_model(name: str, *, vae: str | None = None, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> DiffusionModel:
    """Load an SD1.5 or SDXL pipeline's UNet, VAE, text encoder(s), tokenizer(s) and a DDIM scheduler from a
    hub id or a local dir; the architecture comes from model_index.json's `_class_name`."""
    name = resolve_model_location(name, "base model")
    vae_name = resolve_model_location(vae, "vae") if vae else None
    architecture, index = pipeline_architecture(name)
    with no_library_bars(name, vae_name):
        model = DiffusionModel(
            unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype),
            vae=_load_vae(name, vae_name, architecture, dtype),
            text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(name, subfolder="scheduler"),  # SDXL's Euler config fits DDIM
            architecture=architecture, **(_sdxl_parts(name, index, dtype) if architecture == SDXL else {}))
    for net in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if net is not None:
            net.requires_grad_(False).eval().to(device)
    return model
