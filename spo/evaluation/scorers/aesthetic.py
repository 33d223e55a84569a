"""LAION aesthetic predictor v2 (`sac+logos+ava1-l14-linearMSE.pth`, christophschuhmann/improved-aesthetic-predictor)
on OpenAI CLIP ViT-L/14 (`openai/clip-vit-large-patch14`, a transformers `CLIPModel`, QuickGELU as in OpenAI's).

Score: `head(e / ||e||_2)`, where `e` is the projected CLIP image embedding (768-d), L2-normalised first (without
the normalisation scores come out around 20-30 instead of 1-10). The head is linear end to end
(`layers.{0,2,4,6,7}`: 768 -> 1024 -> 128 -> 64 -> 16 -> 1; the ReLUs are commented out upstream).
No prompt is used: `score` accepts prompts (one per image, for the common interface) and ignores them.
Images: `CLIPImageProcessorPil` from the CLIP model's processor config (OpenAI's preprocess: shortest edge 224
bicubic on the PIL image, centre crop, OpenAI mean/std). fp32 on any device.
`source.file` is the head: the published GitHub URL (downloaded once, sha256-checked), or a local file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from spo.evaluation.scorers.base import BatchedScorer, ClipTowers, ScorerSource, linear_head, normalized, resolve_file


def load_head(path, d_in: int) -> torch.nn.Sequential:
    """The head from its state dict (keys `layers.N.*`, as upstream saves its `MLP` module), strict."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    head = linear_head(d_in)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()}, strict=True)
    return head.float().eval()


class AestheticScore(BatchedScorer):
    name = "aesthetic"

    def __init__(self, model: str, head: str, *, processor: str | None = None, device: str = "cpu",
                 batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        self.clip = ClipTowers(model, processor, self.device)
        self.head = load_head(resolve_file(model, head), self.clip.model.config.projection_dim).to(self.device)

    @classmethod
    def from_source(cls, source: ScorerSource, *, device: str = "cpu", batch_size: int = 16) -> AestheticScore:
        if source.file is None:
            raise ValueError("aesthetic: ScorerSource.file must name the head (sac+logos+ava1-l14-linearMSE.pth)")
        return cls(source.model, source.file, processor=source.processor, device=device, batch_size=batch_size)

    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> torch.Tensor:
        return self.head(normalized(self.clip.image_embeds(images))).squeeze(-1)
