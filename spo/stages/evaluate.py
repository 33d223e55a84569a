"""Stage `evaluate`: every `evaluate.models` entry on the same held-out (prompt, seed) list (DESIGN 3.4).

Protocol: the profile's eval prompts (Pick-a-Pic `validation_unique` captions on real profiles, the held-out
captions on `digits`), DDIM `num_inference_steps`, CFG `guidance_scale`, one generator seed per sample
shared by every model, so every comparison is paired. Images are written as they are made (a restart
samples only what is missing) and scored from the saved PNGs by `evaluate.scorers`: PickScore, HPSv2.1,
ImageReward, LAION aesthetic and CLIP score on real profiles; the world's rater and the SPM on `digits`.

Outputs (out_dir): metrics.json (each model's means with bootstrap CIs, paired win rates and deltas),
scores.parquet (one row per model and sample), protocol.json (what the numbers depend on, with a
fingerprint the registry gate compares), report.html (self-contained), summary.md, grid.png, plots/ and
distributions/ (DVC plots). The images stay in images_dir (default: out_dir + "_images").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir
from spo.config import Config, flat_params
from spo.data.model_locations import base_model_location
from spo.data.prepared_layout import EVAL_PROMPTS_FILE
from spo.data.prompts import read_prompts
from spo.diffusion.cpu_workers import sampling_workers
from spo.evaluation.evaluated_models import ResolvedModel, resolve_models
from spo.evaluation.image_store import Sample
from spo.evaluation.model_comparison import generate_missing, model_store, score_models
from spo.evaluation.report import GridRow, image_grid, write_report
from spo.evaluation.scorer_set import build_scorers
from spo.evaluation.statistics import flat_metrics, model_metrics, summarise
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.parquet"
PROTOCOL_FILE = "protocol.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.md"
GRID_FILE = "grid.png"
NOTES = {
    "spm_reward": "spm_reward is the step-aware preference model at t = 0: the reward SPO optimised, so it "
                  "checks training, not the result. Judge by the other scores.",
    "oracle_utility": "oracle_* are the digits world's rater (the stand-in for Pick-a-Pic's humans), term by "
                      "term: utility = alignment_weight * alignment + aesthetic_weight * aesthetic.",
}


def images_dir_for(out_dir: Path) -> Path:
    """Beside out_dir, not inside it: DVC and atomic_dir replace out_dir whole, the images must survive."""
    return Path(out_dir).with_name(Path(out_dir).name + "_images")


def protocol(cfg: Config, samples: Sequence[Sample], models: Sequence[ResolvedModel]) -> dict:
    """What the numbers depend on. `fingerprint` covers prompts, seeds, sampling and scorers (not the
    models): two runs with the same fingerprint scored the same samples the same way, so their per-sample
    scores pair up (the registry gate relies on it)."""
    ev = cfg.evaluate
    scored = {"prompts": [s.prompt for s in samples], "seeds": [s.seed for s in samples],
              "steps": ev.num_inference_steps, "guidance_scale": ev.guidance_scale, "eta": ev.eta,
              "resolution": cfg.model.resolution, "scorers": [flat_params(s) for s in ev.scorers]}
    fingerprint = hashlib.sha256(json.dumps(scored, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint, "num_prompts": len({s.prompt_index for s in samples}),
            "seeds": list(ev.seeds), "num_samples": len(samples), "sampler": "DDIM",
            "num_inference_steps": ev.num_inference_steps, "guidance_scale": ev.guidance_scale, "eta": ev.eta,
            "resolution": cfg.model.resolution, "confidence": ev.confidence,
            "bootstrap_resamples": ev.bootstrap_resamples,
            "scorers": {s.name: ", ".join(f"{k}={v}" for k, v in flat_params(s).items() if v is not None and k != "name")
                        or "built in" for s in ev.scorers},
            "models": {m.name: m.description for m in models}}


def headline_metrics(summary: dict, models: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """What the pipeline's parent run shows in MLflow's runs table: each model's means and its paired win
    rate vs the baseline, per metric (`spo.pickscore`, `win_rate.spo_vs_base.pickscore`)."""
    out = {f"{m}.{k}": summary["models"][m][k] for m in models for k in metrics}
    for m in models[1:]:
        pair = f"{m}_vs_{models[0]}"
        out.update({f"win_rate.{pair}.{k}": summary["win_rate"][pair][k] for k in metrics})
    return out


def run(cfg: Config, *, prepared_dir: Path, spm_dir: Path, spo_dir: Path | None, out_dir: Path,
        tracker: Tracker, images_dir: Path | None = None, dpo_dir: Path | None = None) -> dict:
    """Sample what is missing, score, summarise; write out_dir atomically; log per model and headline."""
    ev = cfg.evaluate
    device = "cuda" if torch.cuda.is_available() else "cpu"
    captions = read_prompts(Path(prepared_dir) / EVAL_PROMPTS_FILE, ev.num_prompts)
    samples = [Sample(i, caption, seed) for i, caption in enumerate(captions) for seed in ev.seeds]
    models = resolve_models(cfg, base_model_location(cfg, Path(prepared_dir)), {"spo": spo_dir, "dpo": dpo_dir}, device=device)
    names, metrics = [m.name for m in models], [s.name for s in ev.scorers]
    images_dir = Path(images_dir) if images_dir is not None else images_dir_for(out_dir)
    tracker.log_params({"evaluate.num_samples": len(samples), "evaluate.images_dir": str(images_dir)})

    made = generate_missing(models, samples, images_dir, batch_size=ev.batch_size,
                            workers=0 if device == "cuda" else sampling_workers())
    scorers = build_scorers(ev.scorers, prepared_dir=Path(prepared_dir), spm_dir=Path(spm_dir), device=device,
                            batch_size=ev.score_batch_size)
    table = score_models(models, samples, images_dir, scorers, batch_size=ev.score_batch_size)
    summary = summarise(table, metrics=metrics, models=names, baseline=names[0], confidence=ev.confidence,
                        n_resamples=ev.bootstrap_resamples, seed=cfg.seed)
    info = protocol(cfg, samples, models)

    grid_samples = samples[:ev.grid_prompts * len(ev.seeds)]
    stores = {m.name: model_store(images_dir, m) for m in models}
    grid_rows = [GridRow(s.prompt, s.seed, {n: stores[n].load([s])[0] for n in names}) for s in grid_samples]
    notes = [NOTES[k] for k in NOTES if k in metrics]
    with atomic_dir(out_dir) as tmp:
        (tmp / METRICS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (tmp / PROTOCOL_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        table.to_parquet(tmp / SCORES_FILE, index=False)
        grid = image_grid(grid_rows, names) if grid_rows else None
        if grid is not None:
            grid.save(tmp / GRID_FILE)
        write_report(tmp, title=f"SPO evaluation ({cfg.profile})", summary=summary, table=table, metrics=metrics,
                     models=names, grid_rows=grid_rows, protocol=info, notes=notes)

    for model in models:
        with tracker.child(model.name) as child:
            child.log_params({"model": model.name, "model.description": model.description,
                              "model.fingerprint": model.fingerprint, "images_made": made[model.name]})
            child.log_metrics(model_metrics(summary, model.name, baseline=names[0]))
    tracker.log_metrics(flat_metrics(summary))
    tracker.log_pipeline_metrics(headline_metrics(summary, names, metrics))
    for name in (REPORT_FILE, SUMMARY_FILE, SCORES_FILE, PROTOCOL_FILE):
        tracker.log_artifact(Path(out_dir) / name, "evaluation")
    if grid is not None:
        tracker.log_image(grid, GRID_FILE)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    stage_main("evaluate", argv, ["prepared_dir", "spm_dir", "spo_dir", "out_dir", "images_dir?", "dpo_dir?"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, spm_dir=args.spm_dir,
                                              spo_dir=args.spo_dir, out_dir=args.out_dir, tracker=tracker,
                                              images_dir=args.images_dir, dpo_dir=args.dpo_dir))


if __name__ == "__main__":
    main()
