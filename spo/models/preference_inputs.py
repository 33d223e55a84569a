"""CLIP image preprocessing in torch, differentiable, for images in [-1, 1] (B, 3, H, W).

It does what a `CLIPImageProcessor` does to a PIL image — resize the short side (bicubic, antialiased),
centre crop, rescale to [0, 1], normalise with the processor's mean/std — but on tensors, so decoded
x̂0 predictions go straight from the VAE into the preference model without a round trip through PIL.
Values are clamped to [0, 1] before and after the resize, as PIL's uint8 images are. The SPM uses the
published trainer's variant (`as_published_spm`: no antialias), which its checkpoints were trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F


def _size_field(size: Any, key: str) -> int | None:
    """Read `key` from a processor size (dict, SizeDict, or a bare int meaning every field)."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class ClipImageTransform:
    """The numbers of a CLIPImageProcessor that define its pixel values."""

    shortest_edge: int | None  # None = no resize
    crop_size: tuple[int, int] | None  # (height, width); None = no crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # The published SPM resizes with F.interpolate(bicubic) *without* antialias, rounding the long side;
    # PIL (the processor on PIL images) antialiases and transformers truncates. Defaults = the processor.
    antialias: bool = True
    round_long_side: bool = False

    def as_published_spm(self) -> ClipImageTransform:
        """The same numbers with the published SPM's resize (spm_task.py / SPO's scoring path)."""
        return replace(self, antialias=False, round_long_side=True)

    @classmethod
    def from_image_processor(cls, processor: Any) -> ClipImageTransform:
        """Read the transform from a `CLIPImageProcessor` (or a processor holding one)."""
        processor = getattr(processor, "image_processor", processor)
        shortest = _size_field(processor.size, "shortest_edge") if processor.do_resize else None
        if processor.do_resize and shortest is None:
            raise ValueError(f"image processor size {processor.size!r}: expected a 'shortest_edge' size, as CLIP's")
        crop = None
        if processor.do_center_crop:
            crop = (_size_field(processor.crop_size, "height"), _size_field(processor.crop_size, "width"))
        mean = tuple(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0)
        return cls(shortest_edge=shortest, crop_size=crop, mean=mean, std=std)


def resize_shortest_edge(images: torch.Tensor, size: int, *, antialias: bool = True,
                         round_long_side: bool = False) -> torch.Tensor:
    """Bicubic resize so the short side is `size` (long side truncated like transformers, or rounded like
    the published SPM); antialiased like PIL unless `antialias=False` (the published SPM)."""
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(size * long / short + (0.5 if round_long_side else 0.0))
    new_size = (size, new_long) if height <= width else (new_long, size)
    if new_size == (height, width):
        return images
    return F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=antialias)


def center_crop(images: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
    """Crop the centre (top/left offsets rounded down, like transformers); pad with 0 if too small."""
    crop_h, crop_w = crop_size
    height, width = images.shape[-2:]
    if height < crop_h or width < crop_w:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = images.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top:top + crop_h, left:left + crop_w]


def clip_pixel_values(images: torch.Tensor, transform: ClipImageTransform) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> CLIP pixel values (B, 3, crop_h, crop_w), float32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    pixels = (images.float() / 2 + 0.5).clamp(0, 1)
    if transform.shortest_edge is not None:
        pixels = resize_shortest_edge(pixels, transform.shortest_edge, antialias=transform.antialias,
                                      round_long_side=transform.round_long_side).clamp(0, 1)
    if transform.crop_size is not None:
        pixels = center_crop(pixels, transform.crop_size)
    mean = pixels.new_tensor(transform.mean).view(1, 3, 1, 1)
    std = pixels.new_tensor(transform.std).view(1, 3, 1, 1)
    return (pixels - mean) / std
