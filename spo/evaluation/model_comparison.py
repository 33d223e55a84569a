"""Paired comparison of models on one (prompt, seed) list: generate, score, summarise, grid, samples.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from diffusers.utils import make_image_grid, pt_to_pil
from PIL import Image, ImageDraw

from spo.diffusion.cpu_workers import SamplerSpec, sample_jobs
from spo.evaluation.paired_comparison import paired_win_rate
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.tracking.progress import progress

MODELS = ("base", "spo")
BATCH = 64


def generate(specs: dict[str, SamplerSpec], prompts: list[str], seeds: list[int], *,
             workers: int) -> dict[str, torch.Tensor]:
    """Images in [-1, 1] of every model for each (prompt, seed); one worker pool serves all models.
    Per-sample seeds: an image does not depend on its batch-mates (η = 0)."""
    batches = [(prompts[i:i + BATCH], seeds[i:i + BATCH]) for i in range(0, len(prompts), BATCH)]
    jobs = [(spec, batch) for spec in specs.values() for batch in batches]
    with progress(total=len(jobs), desc=f"evaluate: sampling {', '.join(specs)}", unit="batch") as bar:
        images = sample_jobs(jobs, workers, bar)
    return {name: torch.cat(images[i * len(batches):(i + 1) * len(batches)]) for i, name in enumerate(specs)}


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
    """One row per (prompt, seed), one column per model; images in [-1, 1]. The tiles come from
    `make_image_grid`, pasted beside the captions and under the model names."""
    label_w, head = 220, 20
    per_model = [pt_to_pil(images[:len(captions)]) for images in columns.values()]
    tiles = make_image_grid([tile for row in zip(*per_model) for tile in row], rows=len(captions), cols=len(columns))
    grid = Image.new("RGB", (label_w + cell * len(columns), head + cell * len(captions)), "white")
    grid.paste(tiles.resize((cell * len(columns), cell * len(captions)), Image.NEAREST), (label_w, head))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_w + c * cell + 4, 4), name, fill="black")
    for r, caption in enumerate(captions):
        draw.text((4, head + r * cell + cell // 2 - 6), caption[:34], fill="black")
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
