"""The digits world's stand-in for LAION CLIP: a tiny `transformers.CLIPModel`, contrastively pre-trained
on the real digits against their captions, saved with a `CLIPProcessor` in one directory, so
`CLIPModel.from_pretrained(dir)` and `CLIPProcessor.from_pretrained(dir)` work as with
`yuvalkirstain/PickScore_v1` (+ laion's processor). `train_spm` turns it into the PickScore analogue.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTokenizer,
)

from spo.digits.base_model import caption_ids_by_digit
from spo.digits.captions import EVAL_TEMPLATES, make_caption
from spo.tracking.progress import no_library_bars

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_backbone(tokenizer: CLIPTokenizer, image_size: int) -> CLIPModel:
    """ViT with 4x4 patches (16 tokens at 16x16), 2 layers of width 32; text tower of the same size."""
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_channels=3),
        projection_dim=32,
    )
    return CLIPModel(config)


def build_processor(tokenizer: CLIPTokenizer, image_size: int) -> CLIPProcessor:
    """CLIP's preprocessing (bicubic short-side resize, centre crop, CLIP mean/std) at `image_size`."""
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pixel_values(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Images in [-1, 1] already at the model's size -> CLIP-normalised pixel values (what the processor gives)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean_t) / std_t


def multi_positive_clip_loss(logits: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every caption of the same digit counted as a positive."""
    same = (digits[:, None] == digits[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_backbone(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, digits: torch.Tensor, *,
                   steps: int, batch_size: int, learning_rate: float, seed: int) -> float:
    """Contrastive pre-training on (real digit, random train caption of its digit); returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    per_digit_ids, _ = caption_ids_by_digit(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        template = torch.randint(0, per_digit_ids.shape[1], (batch_size,), generator=generator)
        noise = 0.1 * torch.randn(images[index].shape, generator=generator)  # generated images are never clean
        out = model(input_ids=per_digit_ids[digits[index], template],
                    pixel_values=pixel_values((images[index] + noise).clamp(-1, 1)))
        loss = multi_positive_clip_loss(out.logits_per_image, digits[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, digits: torch.Tensor) -> float:
    """Classify each image by its most similar held-out-template caption (averaged over templates)."""
    captions = [make_caption(t, d) for d in range(10) for t in EVAL_TEMPLATES]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    text = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    text = text.view(10, len(EVAL_TEMPLATES), -1).mean(dim=1)  # one prototype per digit
    image = F.normalize(model.get_image_features(pixel_values=pixel_values(images)).pooler_output, dim=-1)
    return ((image @ text.T).argmax(dim=1) == digits).float().mean().item()


def text_encoder_from_backbone(model: CLIPModel) -> CLIPTextModel:
    """A standalone copy of the backbone's text tower: the base model's (frozen) text encoder, as SD1.5's
    text encoder is CLIP ViT-L's text tower."""
    encoder = CLIPTextModel(model.config.text_config)
    encoder.load_state_dict(model.text_model.state_dict())
    return encoder.eval()


def save_backbone(out_dir: Path, model: CLIPModel, processor: CLIPProcessor) -> Path:
    with no_library_bars():
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return out_dir
