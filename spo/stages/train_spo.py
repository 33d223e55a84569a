"""Stage `train_spo`: fine-tune the base UNet with SPO (LoRA); write the adapter and the training log."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir
from spo.config import Config, flat_params
from spo.data.model_locations import base_model_location
from spo.data.prepared_layout import TRAIN_PROMPTS_FILE
from spo.data.prompts import read_prompts
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import add_lora, save_lora
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker
from spo.training.spo_trainer import num_rounds, train_spo
from spo.training.step_sampling import ScoreFn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def spm_scorer(spm: StepAwarePreferenceModel) -> Callable[[list[str]], ScoreFn]:
    """Bind the SPM to a round's prompts: score_fn(images, prompt_index, timesteps)."""
    def for_prompts(prompts: list[str]) -> ScoreFn:
        text_embeds = spm.encode_text(prompts)

        def score(images: torch.Tensor, prompt_index: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return spm.score(images.float(), text_embeds[prompt_index], timesteps.long())
        return score
    return for_prompts


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    fields = list(history[0]) if history else ["step", "loss"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def summarise(history: list[dict[str, float]], seconds: float, rounds: int) -> dict[str, float]:
    if not history:
        return {"optimizer_steps": 0.0, "train_seconds": seconds, "rounds": float(rounds)}
    tail = history[-max(1, len(history) // 10):]
    return {"optimizer_steps": float(len(history)), "rounds": float(rounds), "train_seconds": seconds,
            "final_loss": sum(h["loss"] for h in tail) / len(tail),
            "final_ratio_win": sum(h["ratio_win"] for h in tail) / len(tail),
            "final_ratio_lose": sum(h["ratio_lose"] for h in tail) / len(tail),
            "mean_kept_pair_rate": sum(h["kept_pair_rate"] for h in history) / len(history)}


def run(cfg: Config, *, prepared_dir: Path, spm_dir: Path, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Fine-tune with SPO; write out_dir/lora (diffusers format), history.csv and metrics.json."""
    if cfg.model.architecture != "sd15":
        raise NotImplementedError("train_spo: the SDXL/MSPO path is not implemented yet (model.architecture=sdxl)")
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_diffusion_model(base_model_location(cfg, prepared_dir), vae=cfg.model.vae,
                                 dtype=DTYPES[cfg.model.dtype] if device == "cuda" else torch.float32, device=device)
    spm = StepAwarePreferenceModel.from_pretrained(str(spm_dir / "model")).to(device).eval().requires_grad_(False)
    prompts = read_prompts(prepared_dir / TRAIN_PROMPTS_FILE, cfg.train_spo.max_prompts)
    params = add_lora(model.unet, cfg.train_spo)
    tracker.log_params({**flat_params(cfg.train_spo, "train_spo."), "train_spo.num_prompts": len(prompts),
                        "train_spo.trainable_params": sum(p.numel() for p in params)})
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    train_spo(model, spm_scorer(spm), prompts, params, cfg.train_spo, resolution=cfg.model.resolution,
              seed=cfg.seed, tracker=tracker, history=history)
    metrics = summarise(history, time.perf_counter() - start, num_rounds(len(prompts), cfg.train_spo))
    with atomic_dir(out_dir) as tmp:
        save_lora(model.unet, tmp / "lora")
        write_history(tmp / "history.csv", history)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tracker.log_metrics({f"train_spo.{k}": v for k, v in metrics.items()})
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    stage_main("train_spo", argv, ["prepared_dir", "spm_dir", "out_dir"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, spm_dir=args.spm_dir,
                                              out_dir=args.out_dir, tracker=tracker))


if __name__ == "__main__":
    main()
