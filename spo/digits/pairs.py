"""Pick-a-Pic-format preference pairs from the base model, labelled by the digits world's oracle.

Pair i asks for caption i mod (number of train captions): two samples with different seeds, DDIM 20
steps, CFG 5, η = 1 (the stochastic sampler SPO rolls out with, so the preference models see the kind
of images they will later judge). Images are stored as JPEG, and the oracle rates the decoded JPEGs:
the labels describe exactly the bytes a consumer reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from spo.data.pickapic import decode_image, encode_jpeg
from spo.diffusion.cpu_workers import SamplerSpec, sample_batches
from spo.digits.captions import caption_digit
from spo.digits.preference_oracle import PreferenceOracle
from spo.tracking.progress import progress

MODEL_NAME = "digits-base"
ORACLE_USER_ID = 0
CREATED_AT = pd.Timestamp("2024-01-01")  # fixed, so the parquet is byte-for-byte reproducible


@dataclass(frozen=True)
class SamplingSettings:
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    batch_pairs: int = 50  # pairs sampled per call (2x images)


def pair_seeds(index: int, seed: int) -> tuple[int, int]:
    """Distinct, reproducible noise seeds of pair `index`'s two images."""
    base = seed * 10_000_000 + 2 * index
    return base, base + 1


def sample_pair_images(model_dir: Path, captions: list[str], seeds: list[tuple[int, int]], resolution: int,
                       settings: SamplingSettings, workers: int) -> tuple[list[bytes], list[bytes]]:
    """JPEG bytes of both images of every pair, in batches of `settings.batch_pairs` pairs spread over
    `workers` processes (the bytes do not depend on `workers`)."""
    spec = SamplerSpec(str(model_dir), None, resolution, settings.num_inference_steps, settings.guidance_scale,
                       settings.eta)
    starts = range(0, len(captions), settings.batch_pairs)
    batches = [(captions[i:i + settings.batch_pairs] * 2,
                [s[0] for s in seeds[i:i + settings.batch_pairs]] + [s[1] for s in seeds[i:i + settings.batch_pairs]])
               for i in starts]
    where = f"{workers} workers" if workers else "in this process"
    with progress(total=len(batches), desc=f"prepare: sampling pairs ({where})", unit="batch") as bar:
        chunks = sample_batches(spec, batches, workers, bar)
    jpg_0: list[bytes] = []
    jpg_1: list[bytes] = []
    for images in chunks:
        half = images.shape[0] // 2
        jpg_0 += [encode_jpeg(image) for image in images[:half]]
        jpg_1 += [encode_jpeg(image) for image in images[half:]]
    return jpg_0, jpg_1


def pairs_frame(captions: list[str], jpg_0: list[bytes], jpg_1: list[bytes], label_0: torch.Tensor) -> pd.DataFrame:
    """The Pick-a-Pic columns for labelled pairs (ranking_id = row number; ties have best_image_uid "")."""
    n = len(captions)
    uid_0 = [f"digits-{i:07d}-0" for i in range(n)]
    uid_1 = [f"digits-{i:07d}-1" for i in range(n)]
    labels = label_0.double().tolist()
    per_caption = Counter(captions)
    return pd.DataFrame({
        "are_different": [a != b for a, b in zip(jpg_0, jpg_1)],
        "best_image_uid": [u0 if lab == 1.0 else u1 if lab == 0.0 else "" for u0, u1, lab in zip(uid_0, uid_1, labels)],
        "caption": captions,
        "created_at": [CREATED_AT + pd.Timedelta(seconds=i) for i in range(n)],
        "has_label": [True] * n,
        "image_0_uid": uid_0,
        "image_1_uid": uid_1,
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": labels,
        "label_1": [1.0 - lab for lab in labels],
        "model_0": [MODEL_NAME] * n,
        "model_1": [MODEL_NAME] * n,
        "num_example_per_prompt": [per_caption[c] for c in captions],
        "ranking_id": list(range(n)),
        "user_id": [ORACLE_USER_ID] * n,
    })


def generate_pairs(model_dir: Path, oracle: PreferenceOracle, prompts: list[str], *, num_pairs: int,
                   resolution: int, seed: int, workers: int = 1, settings: SamplingSettings = SamplingSettings()
                   ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Sample, encode, rate. Returns the pairs frame and summary statistics of the pairs and the rater."""
    if num_pairs < 1 or not prompts:
        raise ValueError(f"generate_pairs: need num_pairs >= 1 and prompts (got {num_pairs}, {len(prompts)} prompts)")
    captions = [prompts[i % len(prompts)] for i in range(num_pairs)]
    jpg_0, jpg_1 = sample_pair_images(model_dir, captions, [pair_seeds(i, seed) for i in range(num_pairs)],
                                      resolution, settings, workers)
    images_0 = torch.stack([decode_image(b, resolution, row=i, column="jpg_0") for i, b in enumerate(jpg_0)])
    images_1 = torch.stack([decode_image(b, resolution, row=i, column="jpg_1") for i, b in enumerate(jpg_1)])
    digits = torch.tensor([caption_digit(c) for c in captions])
    label_0, _ = oracle.label_pairs(images_0, images_1, digits, torch.Generator().manual_seed(seed))
    frame = pairs_frame(captions, jpg_0, jpg_1, label_0)
    return frame, pair_statistics(oracle, torch.cat([images_0, images_1]), torch.cat([digits, digits]), label_0)


def pair_statistics(oracle: PreferenceOracle, images: torch.Tensor, digits: torch.Tensor,
                    label_0: torch.Tensor) -> dict[str, float]:
    """Tie fraction, label balance, and the oracle's view of the sampled images."""
    decided = label_0[label_0 != 0.5]
    probs = oracle.class_probabilities(images)
    return {
        "pairs_tie_fraction": (label_0 == 0.5).double().mean().item(),
        "pairs_image0_win_fraction": decided.mean().item() if len(decided) else float("nan"),
        "pairs_alignment_accuracy": (probs.argmax(dim=1) == digits).double().mean().item(),
        "pairs_alignment_mean": probs.gather(1, digits[:, None]).mean().item(),
        "pairs_aesthetic_mean": oracle.aesthetic(images).mean().item(),
    }
