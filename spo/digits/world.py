"""Build the whole digits world into one directory (layout: spo.data.prepared_layout), in one deterministic pass:
oracle classifier -> contrastive backbone (tiny CLIP) -> base diffusion model (its text encoder is the
backbone's text tower, frozen; VAE, then UNet) -> base-model evaluation -> oracle-labelled Pick-a-Pic
pairs -> prompt files.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from spo.atomic_write import write_json
from spo.config import Config
from spo.data import prepared_layout as inputs
from spo.data.pickapic import write_pairs
from spo.diffusion.cpu_workers import in_worker, sampling_workers
from spo.diffusion.sampling import sample_images
from spo.digits import backbone as backbone_lib
from spo.digits.base_model import TrainSettings, fit_vae, train_base_model
from spo.digits.captions import (
    caption_digit,
    eval_captions,
    prompt_records,
    train_captions,
)
from spo.digits.images import holdout_split, image_grid, load_digit_images
from spo.digits.pairs import generate_pairs
from spo.digits.preference_oracle import PreferenceOracle
from spo.digits.tokenizer import build_tokenizer
from spo.models.diffusion_model import load_diffusion_model
from spo.tracking.tracker import Tracker

log = logging.getLogger("spo.prepare")
CLASSIFIER_HOLDOUT = 0.2
EVAL_SEEDS = (0,)  # base-model check: every eval caption with these seeds, DDIM η = 0, CFG 5 (evaluate does more)


class PhaseTimer:
    """Logs and records how long each phase took (timings go to the tracker, not metrics.json)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        log.info("%s ...", name)
        yield
        self.seconds[f"time_{name}_s"] = time.perf_counter() - began
        log.info("%s done in %.1f s", name, self.seconds[f"time_{name}_s"])


def build_digits_world(cfg: Config, out: Path, tracker: Tracker, timer: PhaseTimer) -> dict[str, float]:
    p = cfg.prepare
    images, digits = load_digit_images(p.image_size)
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch) / "tokenizer")

    vae_settings = TrainSettings(p.vae_train_steps, p.train_batch_size, p.learning_rate, cfg.seed + 2)
    with timer.phase("oracle_backbone_and_vae"), in_worker(fit_vae, p.image_size, vae_settings) as vae_job:
        # the VAE needs nothing but the images: it trains on the other core meanwhile
        metrics |= train_oracle(cfg, images, digits, out)
        clip, clip_metrics = train_backbone(cfg, tokenizer, images, digits, out)
        metrics |= clip_metrics
        vae, metrics["vae_mse"] = vae_job.result()

    with timer.phase("base_model"):  # its text encoder is the backbone's text tower, frozen (as in SD1.5)
        metrics |= train_base_model(
            out / inputs.BASE_MODEL_DIR, tokenizer, backbone_lib.text_encoder_from_backbone(clip), vae, images,
            digits, unet_settings=TrainSettings(p.unet_train_steps, p.train_batch_size, p.unet_learning_rate,
                                                cfg.seed + 3))
    oracle = PreferenceOracle.load(out / inputs.ORACLE_DIR)

    model = load_diffusion_model(str(out / inputs.BASE_MODEL_DIR))  # the same loader every later stage uses
    with timer.phase("base_eval"):
        metrics |= evaluate_base_model(model, oracle, p.image_size, tracker)

    with timer.phase("pairs"):
        frame, pair_metrics = generate_pairs(out / inputs.BASE_MODEL_DIR, oracle, train_captions(),
                                             num_pairs=p.num_pairs, resolution=p.image_size, seed=cfg.seed + 4,
                                             workers=sampling_workers(2 * p.num_pairs))
        (out / inputs.PAIRS_DIR).mkdir(parents=True, exist_ok=True)
        write_pairs(frame, out / inputs.PAIRS_DIR / inputs.shard_name(inputs.TRAIN_SPLIT, 0))  # one shard
        metrics |= pair_metrics

    write_json(out / inputs.TRAIN_PROMPTS_FILE, prompt_records(train_captions()))
    write_json(out / inputs.EVAL_PROMPTS_FILE, prompt_records(eval_captions(), first_index=len(train_captions())))
    return metrics


def train_oracle(cfg: Config, images: torch.Tensor, digits: torch.Tensor, out: Path) -> dict[str, float]:
    """The rater's digit classifier, trained on 80% of the real digits; saved to out/oracle."""
    train_idx, holdout_idx = holdout_split(len(images), CLASSIFIER_HOLDOUT, cfg.seed)
    oracle = PreferenceOracle.train(images[train_idx], digits[train_idx], cfg.prepare.oracle, seed=cfg.seed)
    oracle.save(out / inputs.ORACLE_DIR)
    holdout_correct = oracle.class_probabilities(images[holdout_idx]).argmax(1) == digits[holdout_idx]
    return {"oracle_classifier_holdout_accuracy": holdout_correct.float().mean().item(),
            "real_aesthetic_mean": oracle.aesthetic(images[holdout_idx]).mean().item()}


def train_backbone(cfg: Config, tokenizer, images: torch.Tensor, digits: torch.Tensor,
                   out: Path) -> tuple[object, dict[str, float]]:
    """The tiny CLIP, contrastively pre-trained on the digits; saved to out/preference_backbone."""
    p = cfg.prepare
    torch.manual_seed(cfg.seed + 1)
    clip = backbone_lib.build_backbone(tokenizer, p.image_size)
    loss = backbone_lib.train_backbone(clip, tokenizer, images, digits, steps=p.backbone_train_steps,
                                       batch_size=p.train_batch_size, learning_rate=p.learning_rate, seed=cfg.seed + 1)
    backbone_lib.save_backbone(out / inputs.BACKBONE_DIR, clip, backbone_lib.build_processor(tokenizer, p.image_size))
    return clip, {"backbone_final_loss": loss,
                  "backbone_zero_shot_accuracy": backbone_lib.zero_shot_accuracy(clip, tokenizer, images, digits)}


def evaluate_base_model(model, oracle: PreferenceOracle, resolution: int, tracker: Tracker) -> dict[str, float]:
    """Alignment and aesthetics of the base model on the held-out eval captions (DDIM η = 0, CFG 5)."""
    captions = [c for _ in EVAL_SEEDS for c in eval_captions()]
    seeds = [s for s in EVAL_SEEDS for _ in eval_captions()]
    images = sample_images(model, captions, seeds, resolution=resolution, num_inference_steps=20,
                           guidance_scale=5.0, eta=0.0)
    digits = torch.tensor([caption_digit(c) for c in captions])
    probs = oracle.class_probabilities(images)
    tracker.log_image(image_grid(images[:100], nrow=10), "prepare/base_samples_eval_captions.png")
    return {
        "base_alignment_accuracy": (probs.argmax(1) == digits).float().mean().item(),
        "base_alignment_mean": probs.gather(1, digits[:, None]).mean().item(),
        "base_aesthetic_mean": oracle.aesthetic(images).mean().item(),
        "base_aesthetic_std": oracle.aesthetic(images).std().item(),
    }
