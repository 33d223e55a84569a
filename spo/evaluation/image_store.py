"""Evaluation images on disk, one PNG per (model, prompt, seed), written as they are made.

A model's images live under root/<name>-<fingerprint>/, so a restart (a preempted node, a killed run)
samples only what is missing, and a changed model or protocol (another fingerprint) never reuses stale
images. Each PNG is written to a temporary name and renamed, so a file that exists is complete. The
scorers read these uint8 PNGs, the same pixels a user sees (and what the published scorers expect).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt: str
    seed: int


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float (B, 3, H, W) -> uint8 RGB PIL, rounded as diffusers' `output_type="pil"` does."""
    array = ((images.float().clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 RGB PIL -> [-1, 1] float (B, 3, H, W): the tensor form the digits scorers take."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


class ImageStore:
    def __init__(self, root: Path, model_key: str) -> None:
        self.dir = Path(root) / model_key

    def path(self, sample: Sample) -> Path:
        return self.dir / f"{sample.prompt_index:06d}-seed{sample.seed}.png"

    def missing(self, samples: Sequence[Sample]) -> list[Sample]:
        return [s for s in samples if not self.path(s).is_file()]

    def save(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sample, image in zip(samples, images, strict=True):
            final = self.path(sample)
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, final)

    def load(self, samples: Sequence[Sample]) -> list[Image.Image]:
        out = []
        for sample in samples:
            with Image.open(self.path(sample)) as image:
                out.append(image.convert("RGB"))
        return out
