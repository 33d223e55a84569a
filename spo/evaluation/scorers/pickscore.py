"""PickScore (Kirstain et al. 2023): `yuvalkirstain/PickScore_v1`, a fine-tuned CLIP ViT-H/14, as a transformers
`CLIPModel`; its image processor and tokenizer are laion's `CLIP-ViT-H-14-laion2B-s32B-b79K` (`source.processor`).

Score: `logit_scale.exp() * cos(text, image)`, i.e. the logit PickScore's paper and README report (about 20
for the real weights, whose logit scale is 100). Scores compare images of one prompt (their softmax over a
prompt's images is the preference probability); they are not calibrated across prompts.
Images: `CLIPImageProcessorPil` from laion's processor config (shortest edge 224 bicubic on the PIL image,
centre crop 224, OpenAI mean/std), the PIL pipeline of the transformers 4.27 era PickScore was trained with.
Text: `padding=True, truncation=True, max_length=77` (truncation keeps the EOS the text tower pools on).
fp32 on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from spo.evaluation.scorers.base import BatchedScorer, ClipTowers, ScorerSource, normalized


class PickScore(BatchedScorer):
    name = "pickscore"

    def __init__(self, model: str, processor: str | None = None, *, device: str = "cpu",
                 batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        self.clip = ClipTowers(model, processor, self.device)

    @classmethod
    def from_source(cls, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> PickScore:
        return cls(source.model, source.processor, device=device, batch_size=batch_size)

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        i = normalized(self.clip.image_embeds(images))
        t = normalized(self.clip.text_embeds(prompts))
        return self.clip.model.logit_scale.exp().float() * (i * t).sum(-1)
