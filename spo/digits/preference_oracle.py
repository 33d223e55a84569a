"""The generic preference oracle: the digits world's stand-in for Pick-a-Pic's human raters.

    alignment(x, d) = p_clf(d | x)             the digit classifier's probability of the captioned digit d
    aesthetic(x)    = (stroke · background · crispness)^(1/3)         a fixed image-quality score in [0, 1]
    u(x, d)         = w_align · alignment(x, d) + w_aes · aesthetic(x)
    P(x0 ≻ x1)      = σ((u0 − u1) / temperature)                      Bradley-Terry rater noise
    label           = (0.5, 0.5) if |u0 − u1| < tie_margin, else (1, 0) w.p. P(x0 ≻ x1), (0, 1) otherwise

The aesthetic terms, on grey ink g = channel mean of (x + 1) / 2 over the S·S pixels:
    stroke     = clip((mean of the brightest S·S/16 pixels − 0.5) / 0.5, 0, 1)     bright, saturated ink
    background = clip(1 − (mean of the darkest S·S/2 pixels) / 0.15, 0, 1)      a clean black ground
    crispness  = #(g > 0.75) / #(g > 0.25), 0 without ink                      strokes, not grey haze
The geometric mean needs all three: blank, white and grey images score 0, a binarised real digit 1,
real digits about 0.6 and the base model's samples clearly less (hazier, blurrier): the room SPO is
meant to use, which the base model, trained only to imitate the real digits, does not already maximise.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from spo.config import OracleConfig
from spo.digits.images import to_grey

CLASSIFIER_FILE = "classifier.safetensors"
STROKE_FRACTION = 1 / 16  # the brightest pixels that should be full ink
STROKE_FLOOR = 0.5  # stroke brightness that scores 0
BACKGROUND_HAZE = 0.15  # mean brightness of the darkest half that scores 0
INK_LEVEL, SATURATED_LEVEL = 0.25, 0.75
ORACLE_FILE = "oracle.json"


class DigitClassifier(nn.Module):
    """A tiny CNN on grey ink (B, 1, S, S) -> 10 logits."""

    def __init__(self, image_size: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * (image_size // 4) ** 2, 10))

    def forward(self, ink: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ink))


def _prepare_ink(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> grey ink (B, 1, S, S) in [0, 1]."""
    ink = to_grey(images).unsqueeze(1)
    if ink.shape[-1] != image_size:
        ink = F.interpolate(ink, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ink


def _augment(ink: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts of up to one pixel, brightness jitter and pixel noise: robustness to generated digits."""
    b = ink.shape[0]
    padded = F.pad(ink, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    ink = padded[..., dy:dy + ink.shape[-2], dx:dx + ink.shape[-1]]
    gain = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=generator)
    noise = 0.08 * torch.rand(b, 1, 1, 1, generator=generator) * torch.randn(ink.shape, generator=generator)
    return (ink * gain + noise).clamp(0, 1)


def train_classifier(images: torch.Tensor, digits: torch.Tensor, *, steps: int = 300, batch_size: int = 64,
                     learning_rate: float = 3e-3, seed: int = 0) -> DigitClassifier:
    """Train the classifier on real digits with augmentation; deterministic for a seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier(images.shape[-1])
    ink = _prepare_ink(images, model.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(ink), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_augment(ink[index], generator)), digits[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def aesthetic_terms(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three image-quality terms, each (B,) in [0, 1]; see the module docstring."""
    ink = to_grey(images).flatten(1)  # (B, S*S) in [0, 1]
    ranked = ink.sort(dim=1, descending=True).values
    n = ink.shape[1]
    top = ranked[:, :max(1, int(n * STROKE_FRACTION))].mean(dim=1)
    dark_half = ranked[:, n // 2:].mean(dim=1)
    inked = (ink > INK_LEVEL).sum(dim=1).float()
    saturated = (ink > SATURATED_LEVEL).sum(dim=1).float()
    return {
        "stroke": ((top - STROKE_FLOOR) / (1 - STROKE_FLOOR)).clamp(0, 1),
        "background": (1 - dark_half / BACKGROUND_HAZE).clamp(0, 1),
        "crispness": torch.where(inked > 0, saturated / inked.clamp(min=1), torch.zeros_like(inked)),
    }


def aesthetic_score(images: torch.Tensor) -> torch.Tensor:
    """Geometric mean of the aesthetic terms, (B,) in [0, 1]."""
    terms = aesthetic_terms(images)
    return (terms["stroke"] * terms["background"] * terms["crispness"]).pow(1 / 3)


def _as_digits(digits: torch.Tensor | list[int], batch: int) -> torch.Tensor:
    digits = torch.as_tensor(digits, dtype=torch.long).flatten()
    if digits.shape[0] != batch:
        raise ValueError(f"digits: expected {batch} digits (one per image), got {digits.shape[0]}")
    return digits


class PreferenceOracle:
    """The rater of the digits world (formula in the module docstring); deterministic given a generator."""

    def __init__(self, classifier: DigitClassifier, config: OracleConfig) -> None:
        self.classifier = classifier.eval()
        self.config = config

    @classmethod
    def train(cls, images: torch.Tensor, digits: torch.Tensor, config: OracleConfig, *,
              seed: int = 0, steps: int = 300) -> "PreferenceOracle":
        return cls(train_classifier(images, digits, steps=steps, seed=seed), config)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.classifier.state_dict(), str(out_dir / CLASSIFIER_FILE))
        meta = {"config": asdict(self.config), "image_size": self.classifier.image_size,
                "formula": __doc__.strip()}
        (out_dir / ORACLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, directory: str | Path) -> "PreferenceOracle":
        directory = Path(directory)
        for name in (ORACLE_FILE, CLASSIFIER_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"oracle: {directory / name} not found (not an oracle directory?)")
        meta = json.loads((directory / ORACLE_FILE).read_text())
        classifier = DigitClassifier(int(meta["image_size"]))
        classifier.load_state_dict(load_file(str(directory / CLASSIFIER_FILE)))
        return cls(classifier, OracleConfig(**meta["config"]))

    @torch.no_grad()
    def class_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10) classifier probabilities of each digit."""
        return self.classifier(_prepare_ink(images.cpu(), self.classifier.image_size)).softmax(dim=1)

    def alignment(self, images: torch.Tensor, digits: torch.Tensor | list[int]) -> torch.Tensor:
        """(B,) the classifier's probability of each image's captioned digit."""
        probs = self.class_probabilities(images)
        return probs.gather(1, _as_digits(digits, len(images))[:, None]).squeeze(1)

    def aesthetic(self, images: torch.Tensor) -> torch.Tensor:
        return aesthetic_score(images.cpu())

    def utility(self, images: torch.Tensor, digits: torch.Tensor | list[int]) -> torch.Tensor:
        return (self.config.alignment_weight * self.alignment(images, digits)
                + self.config.aesthetic_weight * self.aesthetic(images))

    def preference_probability(self, images_0: torch.Tensor, images_1: torch.Tensor,
                               digits: torch.Tensor | list[int]) -> torch.Tensor:
        """(B,) P(image 0 preferred) = σ((u0 − u1) / temperature)."""
        gap = self.utility(images_0, digits) - self.utility(images_1, digits)
        return torch.sigmoid(gap / self.config.temperature)

    def label_pairs(self, images_0: torch.Tensor, images_1: torch.Tensor, digits: torch.Tensor | list[int],
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick-a-Pic labels (label_0, label_1), float64 in {0, 0.5, 1}, summing to 1."""
        gap = self.utility(images_0, digits) - self.utility(images_1, digits)
        prefer_0 = torch.rand(gap.shape, generator=generator) < torch.sigmoid(gap / self.config.temperature)
        label_0 = torch.where(gap.abs() < self.config.tie_margin, 0.5, prefer_0.double())
        return label_0, 1.0 - label_0
