"""Stage `prepare`: build the data and models every later stage starts from (layout: spo.data.prepared_layout).

For the `digits` profile this builds the embedded world (DESIGN §4) in one deterministic pass:
oracle classifier → contrastive backbone (tiny CLIP) → base diffusion model (its text encoder is the
backbone's text tower, frozen; VAE, then UNet) → base-model evaluation → oracle-labelled Pick-a-Pic
pairs → prompt files → metrics.json.
Everything is written into a temporary sibling and renamed over `out_dir` only on success.
"""

from __future__ import annotations

import time
from pathlib import Path

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config, flat_params
from spo.digits.world import PhaseTimer, build_digits_world
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker

METRICS_FILE = "metrics.json"


def run(cfg: Config, *, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Build the prepared inputs into `out_dir` (all or nothing); returns the metrics of metrics.json."""
    if cfg.prepare.dataset != "digits":
        raise NotImplementedError(f"prepare.dataset={cfg.prepare.dataset!r}: Pick-a-Pic preparation is a later "
                                  "issue; only the embedded 'digits' world is implemented")
    tracker.log_params({"seed": cfg.seed, **{f"prepare.{k}": v for k, v in flat_params(cfg.prepare).items()}})
    timer = PhaseTimer()
    with atomic_dir(out_dir) as staging:
        metrics = build_digits_world(cfg, staging, tracker, timer)
        write_json(staging / METRICS_FILE, metrics)
    timer.seconds["time_total_s"] = time.perf_counter() - timer.start
    tracker.log_metrics({**metrics, **timer.seconds})
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    def body(cfg: Config, args, tracker: Tracker) -> dict[str, float]:
        return run(cfg, out_dir=args.out_dir, tracker=tracker)

    return stage_main("prepare", argv, ["out_dir"], body)


if __name__ == "__main__":
    main()
