"""Paired comparison of models on one (prompt, seed) list: generate, score, summarise, grid, samples.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from spo.config import Config
from spo.diffusion.sampling import sample_images
from spo.evaluation.paired_comparison import paired_win_rate
from spo.models.diffusion_model import DiffusionModel
from spo.models.step_aware_preference_model import StepAwarePreferenceModel

MODELS = ("base", "spo")
BATCH = 64


def generate(model: DiffusionModel, prompts: list[str], seeds: list[int], cfg: Config) -> torch.Tensor:
    """Images in [-1, 1] for each (prompt, seed), sampled in batches (per-sample seeds: batch-independent)."""
    ev = cfg.evaluate
    chunks = [sample_images(model, prompts[i:i + BATCH], seeds[i:i + BATCH], resolution=cfg.model.resolution,
                            num_inference_steps=ev.num_inference_steps, guidance_scale=ev.guidance_scale, eta=ev.eta).cpu()
              for i in range(0, len(prompts), BATCH)]
    return torch.cat(chunks)


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: list[str], spm: StepAwarePreferenceModel,
                 oracle: object | None) -> dict[str, torch.Tensor]:
    """Per-sample scores, (N,) each: preference_score, and on digits the oracle's terms."""
    device = next(spm.parameters()).device
    scores = []
    for i in range(0, len(prompts), BATCH):
        batch = images[i:i + BATCH].to(device)
        text = spm.encode_text(prompts[i:i + BATCH])
        scores.append(spm.score(batch, text, torch.zeros(len(batch), dtype=torch.long, device=device)).cpu())
    out = {"preference_score": torch.cat(scores).float()}
    if oracle is not None:
        from spo.digits.captions import caption_digit

        digits = [caption_digit(p) for p in prompts]
        out["aesthetic"] = oracle.aesthetic(images).float()
        out["alignment"] = oracle.alignment(images, digits).float()
        out["oracle_utility"] = oracle.utility(images, digits).float()
    return out


def image_grid(columns: dict[str, torch.Tensor], captions: list[str], cell: int = 96) -> Image.Image:
    """One row per (prompt, seed), one column per model; images in [-1, 1]."""
    label_w, head = 220, 20
    grid = Image.new("RGB", (label_w + cell * len(columns), head + cell * len(captions)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_w + c * cell + 4, 4), name, fill="black")
    for r, caption in enumerate(captions):
        draw.text((4, head + r * cell + cell // 2 - 6), caption[:34], fill="black")
        for c, images in enumerate(columns.values()):
            pixels = ((images[r].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + c * cell, head + r * cell))
    return grid


def summarise(scores: dict[str, dict[str, torch.Tensor]], confidence: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {m: {k: float(v.mean()) for k, v in scores[m].items()} for m in MODELS}
    out["win_rate"] = {}
    for metric in scores["base"]:
        wr = paired_win_rate(scores["spo"][metric], scores["base"][metric], confidence)
        out["win_rate"].update({metric: wr.rate, f"{metric}_ci_low": wr.low, f"{metric}_ci_high": wr.high})
        out.setdefault("delta", {})[metric] = out["spo"][metric] - out["base"][metric]
    out["win_rate"]["num_samples"] = float(len(next(iter(scores["base"].values()))))
    return out


def write_samples(path: Path, prompts: list[str], seeds: list[int], scores: dict[str, dict[str, torch.Tensor]]) -> None:
    metrics = list(scores["base"])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt", "seed", *metrics])
        for model in MODELS:
            for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                writer.writerow([model, prompt, seed, *(f"{scores[model][m][i].item():.6f}" for m in metrics)])
