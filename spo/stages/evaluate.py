"""Stage `evaluate`: base vs SPO on held-out prompts x fixed seeds (DESIGN 3.4).

Both models sample the same (prompt, seed) list with deterministic DDIM, so every comparison is paired.
Scores: the preference model at t = 0 (the PickScore analogue's role) and, on `digits`, the oracle's
aesthetic and alignment terms separately — the claim under test is "aesthetics up, alignment kept".
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from spo.atomic_write import atomic_dir
from spo.config import Config, flat_params
from spo.diffusion.sampling import sample_images
from spo.lora import load_lora
from spo.models.diffusion_model import DiffusionModel, load_diffusion_model
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.paired_comparison import paired_win_rate
from spo.stages.inputs import EVAL_PROMPTS_FILE, ORACLE_DIR, base_model_location
from spo.stages.stage_cli import stage_main
from spo.stages.train_spo import read_prompts
from spo.tracking import Tracker

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


def load_oracle(cfg: Config, prepared_dir: Path) -> object | None:
    if cfg.prepare.dataset != "digits":
        return None  # real profiles: PickScore / HPSv2.1 / ImageReward / aesthetic scorers (later issue)
    from spo.digits.preference_oracle import PreferenceOracle

    return PreferenceOracle.load(prepared_dir / ORACLE_DIR)


def run(cfg: Config, *, prepared_dir: Path, spm_dir: Path, spo_dir: Path, out_dir: Path,
        tracker: Tracker) -> dict[str, dict[str, float]]:
    """Sample base and SPO on the same (prompt, seed) list; write metrics.json, samples.csv, grid.png."""
    ev = cfg.evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captions = read_prompts(prepared_dir / EVAL_PROMPTS_FILE, ev.num_prompts)
    prompts = [c for c in captions for _ in ev.seeds]
    seeds = [s for _ in captions for s in ev.seeds]
    tracker.log_params({**flat_params(ev, "evaluate."), "evaluate.num_samples": len(prompts)})
    spm = StepAwarePreferenceModel.from_pretrained(str(spm_dir / "model")).to(device).eval()
    oracle = load_oracle(cfg, prepared_dir)
    model = load_diffusion_model(base_model_location(cfg, prepared_dir), vae=cfg.model.vae, device=device)
    images = {"base": generate(model, prompts, seeds, cfg)}
    load_lora(model.unet, spo_dir / "lora")
    images["spo"] = generate(model, prompts, seeds, cfg)
    scores = {m: score_images(images[m], prompts, spm, oracle) for m in MODELS}
    summary = summarise(scores, ev.confidence)
    rows = min(ev.grid_prompts * len(ev.seeds), len(prompts))
    grid = image_grid({m: images[m][:rows] for m in MODELS},
                      [f"{p} (seed {s})" for p, s in zip(prompts[:rows], seeds[:rows])])
    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        write_samples(tmp / "samples.csv", prompts, seeds, scores)
        grid.save(tmp / "grid.png")
    for m in MODELS:
        with tracker.child(m) as child:
            child.log_params({"model": m})
            child.log_metrics(summary[m])
    tracker.log_metrics({f"win_rate.{k}": v for k, v in summary["win_rate"].items()})
    tracker.log_metrics({f"delta.{k}": v for k, v in summary["delta"].items()})
    tracker.log_image(grid, "grid.png")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    stage_main("evaluate", argv, ["prepared_dir", "spm_dir", "spo_dir", "out_dir"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, spm_dir=args.spm_dir,
                                              spo_dir=args.spo_dir, out_dir=args.out_dir, tracker=tracker))


if __name__ == "__main__":
    main()
