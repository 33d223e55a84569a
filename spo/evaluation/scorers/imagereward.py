"""ImageReward (Xu et al. 2023): `THUDM/ImageReward` / `ImageReward.pt` + `med_config.json`, loaded without the
`image-reward` package (which pins timm 0.6 and does not import on transformers 5) into transformers modules.

Model: BLIP's ViT-L/16 at 224 as `BlipVisionModel` (LayerNorm eps 1e-6, not transformers' 1e-5) and BLIP's
med BERT with cross-attention in every layer as `BlipTextModel(add_pooling_layer=False)` (`is_decoder=True` in
the config, which is what makes transformers build the cross-attention; the forward runs with the default
bidirectional mask), plus the linear MLP head. `ImageReward.pt`'s keys are remapped (`split_imagereward`: the
renaming of transformers' BLIP conversion script) and each part is loaded `strict=True`; every checkpoint key
must be consumed (only `blip.vision_proj`, `blip.text_proj` and the `position_ids` buffer are unused by the
score), and a missing or unknown key raises naming it in the checkpoint's own layout.
Configs: the text config from the repo's `med_config.json` (BERT keys -> BlipTextConfig; `encoder_width` is
overwritten with the vision width, 1024, as BLIP_Pretrain does); the vision config is the fixed ViT-L/16@224
(`IR_VISION`) unless the model *directory* holds a `vision_config.json` (BlipVisionConfig keys: stand-ins only).
Tokenizer: `bert-base-uncased` (`source.tokenizer`; BLIP's added [DEC]/[ENC] do not change ordinary ids),
`padding="max_length", truncation=True, max_length=35`; the first token stays [CLS].
Images: `CLIPImageProcessorPil(shortest_edge=S, crop S)` with S the vision image size (224): ImageReward's
Resize(bicubic, PIL) + CenterCrop + ToTensor + OpenAI mean/std.
Score: `(mlp(CLS.float()) - 0.16717362830052426) / 1.0333394966054072` (ImageReward's standardisation), with
CLS the text encoder's first output token. fp32 on any device. `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from spo.evaluation.scorers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BatchedScorer,
    ScorerSource,
    check_local,
    linear_head,
    resolve_file,
)

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
DEFAULT_TOKENIZER = "bert-base-uncased"
VISION_CONFIG_FILE = "vision_config.json"
# BLIP_Pretrain(image_size=224, vit="large"): patch 16, width 1024, depth 24, 16 heads, qkv bias, LN eps 1e-6.
IR_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
# med_config.json (BERT) key -> BlipTextConfig key; the rest of med_config.json has no counterpart.
MED_TO_BLIP_TEXT = {k: k for k in (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id",
    "sep_token_id")}
# ImageReward ViT name -> transformers BlipVisionModel name (after the `blip.visual_encoder.` prefix)
_VIT = (("blocks.", "encoder.layers."), (".attn.qkv.", ".self_attn.qkv."), (".attn.proj.", ".self_attn.projection."),
        (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
        ("patch_embed.proj.", "embeddings.patch_embedding."), ("pos_embed", "embeddings.position_embedding"),
        ("cls_token", "embeddings.class_embedding"))
PREFIXES = {"vision": "blip.visual_encoder.", "text": "blip.text_encoder.", "mlp": "mlp.layers."}
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def vision_key(key: str) -> str:
    """ImageReward ViT key (without `blip.visual_encoder.`) -> BlipVisionModel key."""
    if key.startswith("norm."):
        return "post_layernorm." + key[len("norm."):]
    for old, new in _VIT:
        key = key.replace(old, new)
    return key


def split_imagereward(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """ImageReward.pt -> ({"vision"|"text"|"mlp": state dict in transformers names}, {new name: original name}).
    A key outside the known prefixes raises naming it."""
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    origin: dict[str, str] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith(UNUSED):
            continue
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                new = vision_key(rest) if part == "vision" else rest
                parts[part][new] = value
                origin[f"{part}:{new}"] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"ImageReward checkpoint: unknown keys {sorted(unknown)}")
    return parts, origin


def original_key(part: str, key: str) -> str:
    """The ImageReward.pt name a transformers-side key of `part` comes from (for error messages)."""
    if part == "vision":
        if key.startswith("post_layernorm."):
            return PREFIXES[part] + "norm." + key[len("post_layernorm."):]
        for old, new in reversed(_VIT):
            key = key.replace(new, old)
    return PREFIXES[part] + key


def load_part(module: nn.Module, part: str, sd: dict[str, torch.Tensor]) -> None:
    """Strict load, with missing keys named as in ImageReward.pt."""
    missing = sorted(set(module.state_dict()) - set(sd))
    if missing:
        raise KeyError(f"ImageReward checkpoint: missing keys {[original_key(part, k) for k in missing]}")
    module.load_state_dict(sd, strict=True)


def text_config(med: dict, encoder_width: int):
    """BlipTextConfig from BLIP's med_config.json (BERT keys), cross-attending to `encoder_width` features."""
    from transformers import BlipTextConfig

    kwargs = {new: med[old] for old, new in MED_TO_BLIP_TEXT.items() if old in med}
    return BlipTextConfig(**kwargs, encoder_hidden_size=encoder_width, is_decoder=True)


def vision_config(model: str):
    from transformers import BlipVisionConfig

    path = Path(model).expanduser() / VISION_CONFIG_FILE  # only a local model dir can hold one
    local = Path(model).expanduser().is_dir() and path.is_file()
    return BlipVisionConfig(**(json.loads(path.read_text()) if local else IR_VISION))


class ImageReward(BatchedScorer):
    name = "imagereward"

    def __init__(self, checkpoint: str | Path, med_config: str | Path, tokenizer: str = DEFAULT_TOKENIZER, *,
                 vision=None, device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import BertTokenizer, BlipTextModel, BlipVisionConfig, BlipVisionModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        super().__init__(device, batch_size)
        vision = vision if vision is not None else BlipVisionConfig(**IR_VISION)
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text_config(json.loads(Path(med_config).read_text()), vision.hidden_size),
                                  add_pooling_layer=False)
        self.mlp = linear_head(self.text.config.hidden_size)
        parts, _ = split_imagereward(torch.load(checkpoint, map_location="cpu", weights_only=True))
        for part, module in (("vision", self.vision), ("text", self.text), ("mlp", self.mlp)):
            load_part(module, part, parts[part])
        for module in (self.vision, self.text, self.mlp):
            module.float().eval().to(self.device)
        check_local(tokenizer, "imagereward tokenizer")
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        size = vision.image_size
        self.image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))

    @classmethod
    def from_source(cls, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> ImageReward:
        check_local(source.model, "imagereward model")
        return cls(resolve_file(source.model, source.file or "ImageReward.pt"),
                   resolve_file(source.model, "med_config.json"), source.tokenizer or DEFAULT_TOKENIZER,
                   vision=vision_config(source.model), device=device, batch_size=batch_size)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.pixel_values(images).to(self.device, torch.float32)
        tx = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt").to(self.device)
        img = self.vision(pixel_values=px).last_hidden_state
        att = torch.ones(img.shape[:-1], dtype=torch.long, device=self.device)
        cls = self.text(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"], encoder_hidden_states=img,
                        encoder_attention_mask=att, is_decoder=False, use_cache=False).last_hidden_state[:, 0]
        return ((self.mlp(cls.float()) - IR_MEAN) / IR_STD).squeeze(-1)
