"""Step-aware preference model (SPM, DESIGN 3.1): a CLIP/PickScore scorer conditioned on the timestep.

Notation map (SPO paper / DiT -> code), B images, N tokens, D = vision hidden size:
    t ∈ {0..999}                      timesteps                 (B,)
    c = MLP(sinusoid_256(t))          time_cond                 (B, D)
    shift/scale/gate per block        block_modulations[i](c)   6 × (B, D)
    adaLN(x) = LN(x)·(1+scale)+shift  _modulate
    x ← x + gate·Attn(adaLN₁(x));  x ← x + gate·MLP(adaLN₂(x))
    pooled ← LN_post(x_cls)·(1+scale)+shift                      pooled_modulation(c)
    f_V(x̂0, t) = proj(pooled)/‖·‖    image_embeds               (B, P)
    s = exp(τ)·⟨f_V, f_T⟩             score                      (B,)

The time-conditioned forward of the vision tower is written here and reuses the backbone's own layers
(embeddings, self_attn, layer_norm1/2, mlp, post_layernorm, visual_projection); nothing in transformers
is patched. With the identity initialisation (modulation weights 0, shift/scale biases 0, gate biases
1) every modulation is `x·1 + 0` and every gate `1·x`, so the SPM equals its backbone exactly, at every
t. (The published constructor set all six biases to 1; its trainer re-initialised them. We don't copy
that.)

A saved SPM directory is a plain `CLIPModel` + `CLIPProcessor` directory (so any CLIP loader reads the
fine-tuned backbone) plus `time_conditioning.safetensors` and `spm.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from spo.models.diffusion_model import resolve_model_location
from spo.models.preference_inputs import ClipImageTransform, clip_pixel_values
from spo.tracking.progress import no_library_bars

SPM_CONFIG_FILE = "spm.json"
TIME_WEIGHTS_FILE = "time_conditioning.safetensors"
FORMAT_NAME = "spo-step-aware-preference-model"
FREQUENCY_DIM = 256
MAX_PERIOD = 10000


def timestep_sinusoids(timesteps: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: int = MAX_PERIOD) -> torch.Tensor:
    """DiT/GLIDE sinusoidal embedding [cos(t·f), sin(t·f)], f_i = max_period^(-i/half): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """sinusoid_256(t) -> Linear(256, D) -> SiLU -> Linear(D, D); one shared by every vision block."""

    def __init__(self, hidden_size: int, frequency_dim: int = FREQUENCY_DIM, max_period: int = MAX_PERIOD) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_sinusoids(timesteps, self.frequency_dim, self.max_period))


def _modulation(hidden_size: int, chunks: int, gate_chunks: tuple[int, ...]) -> nn.Sequential:
    """SiLU -> Linear(D, chunks·D), identity init: weight 0, bias 0 except 1 on the gate chunks."""
    linear = nn.Linear(hidden_size, chunks * hidden_size)
    nn.init.zeros_(linear.weight)
    with torch.no_grad():
        linear.bias.zero_()
        for k in gate_chunks:
            linear.bias[k * hidden_size:(k + 1) * hidden_size] = 1.0
    return nn.Sequential(nn.SiLU(), linear)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) or (B, D); shift/scale (B, D)."""
    if x.ndim == 3:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


class StepAwarePreferenceModel(nn.Module):
    """CLIP backbone + DiT-style timestep conditioning of its vision tower (DESIGN 3.1)."""

    def __init__(self, clip: CLIPModel, processor: CLIPProcessor) -> None:
        super().__init__()
        self.clip = clip
        self.processor = processor
        # x̂0 images are resized as the published SPM was trained (no antialias): its checkpoint expects it
        self.image_transform = ClipImageTransform.from_image_processor(processor).as_published_spm()
        hidden = clip.config.vision_config.hidden_size
        num_layers = len(clip.vision_model.encoder.layers)
        self.time_embedder = TimestepEmbedder(hidden)
        # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (published order)
        self.block_modulations = nn.ModuleList(_modulation(hidden, 6, gate_chunks=(2, 5)) for _ in range(num_layers))
        self.pooled_modulation = _modulation(hidden, 2, gate_chunks=())  # shift, scale

    # ------------------------------------------------------------------------------------------------
    # construction, saving, loading

    @classmethod
    def from_backbone(cls, name_or_dir: str, processor: str | None = None) -> StepAwarePreferenceModel:
        """Identity-initialised SPM on a CLIP backbone (hub id or local dir); processor defaults to it."""
        backbone = resolve_model_location(name_or_dir, "preference backbone")
        processor_location = resolve_model_location(processor, "preference processor") if processor else backbone
        with no_library_bars(backbone, processor_location):
            clip = CLIPModel.from_pretrained(backbone, dtype=torch.float32)
            return cls(clip, CLIPProcessor.from_pretrained(processor_location))

    def save_pretrained(self, directory: str | Path) -> None:
        """Backbone + processor (a plain CLIP dir) + time-conditioning weights + spm.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with no_library_bars():
            self.clip.save_pretrained(directory)
            self.processor.save_pretrained(directory)
        time_state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                      if not k.startswith("clip.")}
        save_file(time_state, str(directory / TIME_WEIGHTS_FILE))
        (directory / SPM_CONFIG_FILE).write_text(json.dumps({
            "format": FORMAT_NAME, "frequency_dim": self.time_embedder.frequency_dim,
            "max_period": self.time_embedder.max_period}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> StepAwarePreferenceModel:
        """Load a directory written by `save_pretrained` (local only, no network)."""
        directory = Path(directory)
        config_path = directory / SPM_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"not a step-aware preference model directory "
                                    f"(missing {SPM_CONFIG_FILE}): {directory}")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT_NAME:
            raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT_NAME!r}")
        if (config.get("frequency_dim"), config.get("max_period")) != (FREQUENCY_DIM, MAX_PERIOD):
            raise ValueError(f"{config_path}: timestep embedding {config}, this code builds "
                             f"frequency_dim={FREQUENCY_DIM}, max_period={MAX_PERIOD}")
        model = cls.from_backbone(str(directory))
        state = load_file(str(directory / TIME_WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("clip.")]
        if missing or unexpected:
            raise ValueError(f"{directory / TIME_WEIGHTS_FILE}: missing keys {missing}, unexpected keys {unexpected}")
        return model

    @property
    def device(self) -> torch.device:
        return self.clip.logit_scale.device

    # ------------------------------------------------------------------------------------------------
    # text side (unchanged CLIP)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="pt").to(self.device)
        out = self.clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings f_T(c), (B, P)."""
        return nn.functional.normalize(self._text_features(prompts).float(), dim=-1)

    # ------------------------------------------------------------------------------------------------
    # image side: the time-conditioned vision tower

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> CLIP pixel values on the model's device."""
        return clip_pixel_values(images.to(self.device), self.image_transform)

    def _vision_block(self, layer: nn.Module, modulation: nn.Module, hidden: torch.Tensor,
                      time_cond: torch.Tensor) -> torch.Tensor:
        """One CLIPEncoderLayer with adaLN: same sub-layers and order as transformers' forward."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(time_cond).chunk(6, dim=-1)
        residual = hidden
        hidden = _modulate(layer.layer_norm1(hidden), shift_msa, scale_msa)
        hidden, _ = layer.self_attn(hidden_states=hidden, attention_mask=None)
        hidden = residual + gate_msa[:, None] * hidden
        residual = hidden
        hidden = _modulate(layer.layer_norm2(hidden), shift_mlp, scale_mlp)
        hidden = layer.mlp(hidden)
        return residual + gate_mlp[:, None] * hidden

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected image features of the time-conditioned vision tower, (B, P)."""
        vision = self.clip.vision_model
        timesteps = timesteps.to(self.device).expand(pixel_values.shape[0]) if timesteps.ndim == 0 \
            else timesteps.to(self.device)
        time_cond = self.time_embedder(timesteps)  # (B, D)
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))  # (B, N, D)
        for layer, modulation in zip(vision.encoder.layers, self.block_modulations):
            hidden = self._vision_block(layer, modulation, hidden, time_cond)
        pooled = vision.post_layernorm(hidden[:, 0, :])  # CLS token, (B, D)
        shift, scale = self.pooled_modulation(time_cond).chunk(2, dim=-1)
        return self.clip.visual_projection(_modulate(pooled, shift, scale))

    def image_embeds(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """L2-normalised f_V(x̂0, t) for images in [-1, 1], (B, 3, H, W); timesteps (B,) long or scalar."""
        features = self.image_features(self.pixel_values(images), timesteps)
        return nn.functional.normalize(features.float(), dim=-1)

    def score(self, images: torch.Tensor, text_embeds: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """s = exp(τ)·cos(f_V(x̂0, t), f_T(c)), (B,). `text_embeds` from `encode_text` (normalised)."""
        return self.scale_cosine(self.image_embeds(images, timesteps), text_embeds)

    # ------------------------------------------------------------------------------------------------
    # the plain backbone (no time conditioning): PickScore itself, through transformers' own forward

    def backbone_image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of the plain backbone (`CLIPModel.get_image_features`), (B, P)."""
        out = self.clip.get_image_features(pixel_values=self.pixel_values(images))
        image_features = out if isinstance(out, torch.Tensor) else out.pooler_output
        return nn.functional.normalize(image_features.float(), dim=-1)

    def backbone_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The plain CLIP/PickScore score exp(τ)·cos, (B,), computed by `CLIPModel` without any t."""
        return self.scale_cosine(self.backbone_image_embeds(images), self.encode_text(prompts))

    def scale_cosine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """exp(τ)·⟨img, txt⟩ for normalised embeddings, row by row, (B,)."""
        return self.clip.logit_scale.exp().float() * (image_embeds.float() * text_embeds.float()).sum(-1)

    def time_conditioning_parameters(self) -> list[nn.Parameter]:
        """The parameters added to the backbone (empty gradient until training starts)."""
        return [p for name, p in self.named_parameters() if not name.startswith("clip.")]
