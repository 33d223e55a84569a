"""CLIP score (Hessel et al. 2021, as torchmetrics computes it): a transformers `CLIPModel`, by default
`openai/clip-vit-large-patch14` (torchmetrics' default; the diffusers guide uses clip-vit-base-patch16: the
backbone is recorded as `backbone`, and scores of different backbones never compare).

Score per sample: `max(100 * cos(image, text), 0)`, clamped per sample. (torchmetrics clamps the *mean*;
the mean of our per-sample scores is >= its value, equal when no cosine is negative.)
Images: uint8 PIL through `CLIPImageProcessorPil` from the model's processor config (never floats in [0, 1],
which the processor would rescale again). Text: `padding=True, truncation=True, max_length=77`, truncated by
the tokenizer so the EOS stays (torchmetrics slices the ids instead, dropping it for long captions).
fp32 on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from spo.evaluation.scorers.base import BatchedScorer, ClipTowers, ScorerSource, normalized


class ClipScore(BatchedScorer):
    name = "clip_score"

    def __init__(self, model: str, processor: str | None = None, *, device: str = "cpu",
                 batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        self.backbone = model
        self.clip = ClipTowers(model, processor, self.device)

    @classmethod
    def from_source(cls, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> ClipScore:
        return cls(source.model, source.processor, device=device, batch_size=batch_size)

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        i = normalized(self.clip.image_embeds(images))
        t = normalized(self.clip.text_embeds(prompts))
        return (100 * (i * t).sum(-1)).clamp(min=0)
