"""The real handwritten digits (scikit-learn's 1,797 8x8 scans) as images in the project's convention.

Upsampled to `image_size` (bilinear), grey replicated to RGB, ink bright on a dark background, values
in [-1, 1]: (N, 3, S, S) float32, like a diffusers VAE's output.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

MAX_INK = 16.0  # load_digits values are counts 0..16 of inked pixels in 4x4 cells


def load_digit_images(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, S, S) in [-1, 1], digits (N,) int64), in scikit-learn's order."""
    data = load_digits()
    ink = torch.from_numpy(data.images.astype(np.float32) / MAX_INK).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if image_size != ink.shape[-1]:
        ink = F.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (ink.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(data.target.astype(np.int64))


def holdout_split(n: int, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded (train indices, held-out indices) split of range(n)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_holdout = int(round(n * holdout_fraction))
    return order[n_holdout:].sort().values, order[:n_holdout].sort().values


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> ink intensity (B, H, W) in [0, 1] (channel mean)."""
    return ((images.float().mean(dim=1) + 1) / 2).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int, scale: int = 4):
    """A PIL grid of (B, 3, H, W) images in [-1, 1] in `nrow` rows, each enlarged `scale` times (nearest)."""
    from diffusers.utils import make_image_grid, pt_to_pil
    from PIL import Image

    tiles = pt_to_pil(images)
    ncol = -(-len(tiles) // nrow)
    tiles += [Image.new("RGB", tiles[0].size)] * (nrow * ncol - len(tiles))  # black, like the background
    grid = make_image_grid(tiles, rows=nrow, cols=ncol)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
