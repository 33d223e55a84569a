"""Stage `prepare`: build the data and models every later stage starts from (layout: spo.data.prepared_layout).

For the `digits` profile this builds the embedded world (DESIGN §4) in one deterministic pass:
oracle classifier → contrastive backbone (tiny CLIP) → base diffusion model (its text encoder is the
backbone's text tower, frozen; VAE, then UNet) → base-model evaluation → oracle-labelled Pick-a-Pic
pairs → prompt files → metrics.json.
Everything is written into a temporary sibling and renamed over `out_dir` only on success.
"""

from __future__ import annotations

import os
import sys

# libgomp's default busy-waiting makes 2-thread torch up to 40x slower on this world's tiny ops when
# another process holds a core; passive waiting costs nothing when the cores are free. libgomp reads the
# variable when torch loads, so it only helps if nothing imported torch before this module.
PASSIVE_OPENMP = "torch" not in sys.modules or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from spo.atomic_write import atomic_dir, write_json  # noqa: E402
from spo.config import Config, flat_params  # noqa: E402
from spo.digits.world import PhaseTimer, build_digits_world  # noqa: E402
from spo.stages.stage_cli import stage_main  # noqa: E402
from spo.tracking.tracker import Tracker  # noqa: E402

METRICS_FILE = "metrics.json"
MAX_TORCH_THREADS = 2  # the digits profile's 2-core CPU
CLASSIFIER_HOLDOUT = 0.2
EVAL_SEEDS = (0,)  # base-model check: every eval caption with these seeds, DDIM η = 0, CFG 5 (evaluate does more)


def stage_threads() -> int:
    """Torch threads for this stage: 2, or fewer if OMP_NUM_THREADS (torch's default) says so; 1 if
    OpenMP busy-waits. Measured on a 2-core CPU another process was using, 2 threads ran these tiny
    networks 25-40x slower than 1 with busy-waiting and 1.6x slower with passive waiting (up to 25x for
    the tiny classifier), so on a shared CPU set OMP_NUM_THREADS=1. Thread counts change float rounding
    only; for a given count the outputs are byte-for-byte reproducible."""
    return min(MAX_TORCH_THREADS, torch.get_num_threads()) if PASSIVE_OPENMP else 1


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(cfg: Config, *, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Build the prepared inputs into `out_dir` (all or nothing); returns the metrics of metrics.json."""
    if cfg.prepare.dataset != "digits":
        raise NotImplementedError(f"prepare.dataset={cfg.prepare.dataset!r}: Pick-a-Pic preparation is a later "
                                  "issue; only the embedded 'digits' world is implemented")
    tracker.log_params({"seed": cfg.seed, **{f"prepare.{k}": v for k, v in flat_params(cfg.prepare).items()}})
    timer = PhaseTimer()
    threads = stage_threads()
    with torch_threads(threads), atomic_dir(out_dir) as staging:
        metrics = build_digits_world(cfg, staging, tracker, timer)
        write_json(staging / METRICS_FILE, metrics)
    timer.seconds["time_total_s"] = time.perf_counter() - timer.start
    tracker.log_metrics({**metrics, **timer.seconds, "torch_threads": float(threads)})
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    def body(cfg: Config, args, tracker: Tracker) -> dict[str, float]:
        return run(cfg, out_dir=args.out_dir, tracker=tracker)

    return stage_main("prepare", argv, ["out_dir"], body)


if __name__ == "__main__":
    main()
