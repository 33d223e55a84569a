"""Stage `prepare`: build the data and models every later stage starts from (layout: spo.data.prepared_layout).

For the `digits` profile this builds the embedded world (DESIGN §4) in one deterministic pass:
oracle classifier → contrastive backbone (tiny CLIP) → base diffusion model (its text encoder is the
backbone's text tower, frozen; VAE, then UNet) → base-model evaluation → oracle-labelled Pick-a-Pic
pairs → prompt files → metrics.json. For `sd15` / `sdxl` it streams Pick-a-Pic (a local mirror or the hub)
into parquet shards and records the models' hub ids (spo.data.pickapic_source).
Everything is written into a temporary sibling and renamed over `out_dir` only on success.
"""

from __future__ import annotations

import time
from pathlib import Path

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config, flat_params
from spo.data.pickapic_source import prepare_pickapic
from spo.digits.world import PhaseTimer, build_digits_world
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker

METRICS_FILE = "metrics.json"
# the prepare.* keys a Pick-a-Pic run reads (the rest size the digits world only)
PICKAPIC_PARAMS = ("dataset", "data_dir", "shards", "max_pairs", "rows_per_shard", "train_prompts", "eval_prompts")


def run(cfg: Config, *, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Build the prepared inputs into `out_dir` (all or nothing); returns the metrics of metrics.json."""
    if cfg.prepare.dataset != "digits":
        return _run_pickapic(cfg, out_dir=out_dir, tracker=tracker)
    tracker.log_params({"seed": cfg.seed, **{f"prepare.{k}": v for k, v in flat_params(cfg.prepare).items()}})
    timer = PhaseTimer()
    with atomic_dir(out_dir) as staging:
        metrics = build_digits_world(cfg, staging, tracker, timer)
        write_json(staging / METRICS_FILE, metrics)
    timer.seconds["time_total_s"] = time.perf_counter() - timer.start
    tracker.log_metrics({**metrics, **timer.seconds})
    return metrics


def _run_pickapic(cfg: Config, *, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Real profiles: Pick-a-Pic pairs, prompt files and models.json (spo.data.pickapic_source), all or nothing."""
    tracker.log_params({"seed": cfg.seed, **{f"prepare.{k}": v for k, v in flat_params(cfg.prepare).items()
                                             if k in PICKAPIC_PARAMS}})
    with atomic_dir(out_dir) as staging:
        metrics = prepare_pickapic(cfg, staging)
        # counts only: a DVC metric that changed on every run (the time) would make every run look different
        write_json(staging / METRICS_FILE, {k: v for k, v in metrics.items() if k != "seconds"})
    tracker.log_metrics(metrics)
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    def body(cfg: Config, args, tracker: Tracker) -> dict[str, float]:
        return run(cfg, out_dir=args.out_dir, tracker=tracker)

    return stage_main("prepare", argv, ["out_dir"], body)


if __name__ == "__main__":
    main()
