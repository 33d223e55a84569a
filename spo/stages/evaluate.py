"""Stage `evaluate`: base vs SPO on held-out prompts x fixed seeds (DESIGN 3.4).

Both models sample the same (prompt, seed) list with deterministic DDIM, so every comparison is paired.
Scores: the preference model at t = 0 (the PickScore analogue's role) and, on `digits`, the oracle's
aesthetic and alignment terms separately — the claim under test is "aesthetics up, alignment kept".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir
from spo.config import Config, flat_params
from spo.data.model_locations import base_model_location
from spo.data.prepared_layout import EVAL_PROMPTS_FILE, ORACLE_DIR
from spo.data.prompts import read_prompts
from spo.diffusion.cpu_workers import SamplerSpec, sampling_workers
from spo.evaluation.model_comparison import (
    MODELS,
    generate,
    image_grid,
    score_images,
    summarise,
    write_samples,
)
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker


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
    # CPU: worker processes on one thread each (the same images for any core count); GPU: this process
    spec = SamplerSpec(base_model_location(cfg, prepared_dir), None, cfg.model.resolution, ev.num_inference_steps,
                       ev.guidance_scale, ev.eta, vae_dir=cfg.model.vae, device=device)
    images = generate({"base": spec, "spo": replace(spec, lora_dir=str(spo_dir / "lora"))}, prompts, seeds,
                      workers=0 if device == "cuda" else sampling_workers())
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
