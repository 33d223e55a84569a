"""Stage `train_spm`: train the step-aware preference model on Pick-a-Pic-format pairs (DESIGN 3.1).

Inputs: `prepared_dir/pairs.parquet` (caption, jpg_0, jpg_1, label_0, label_1), the base diffusion model
and the preference backbone (hub ids of a real profile, or what `prepare` built for digits).
Outputs, all or nothing: `out_dir/model/` (the SPM, `StepAwarePreferenceModel.save_pretrained`) and
`out_dir/metrics.json` (pairwise accuracy at each eval timestep before and after training, and the
backbone's accuracy on clean images).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config
from spo.data.pickapic import read_pairs
from spo.data.prepared_layout import (
    PAIRS_FILE,
    base_model_location,
    preference_backbone_location,
)
from spo.models.diffusion_model import load_diffusion_model
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker
from spo.training.spm_inputs import (
    X0Job,
    X0WorkerSpec,
    in_process_source,
    pair_loader,
    plan_eval_jobs,
    plan_training_jobs,
    prefetched_source,
)
from spo.training.spm_training import (
    autocast_factory,
    backbone_clean_accuracy,
    evaluate_accuracy,
    frozen_copy,
    relabelled_by_backbone,
    train_preference_backbone,
    train_spm,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_FRACTION = 0.1  # held out for accuracy
MAX_EVAL_PAIRS = 1000  # the published SPM validates on Pick-a-Pic's ~500 validation_unique pairs


# ----------------------------------------------------------------------------------------------------
# pairs


def read_training_pairs(path: Path) -> pd.DataFrame:
    """The pairs table (spo.data.pickapic) with its labels and captions checked: bad rows are named."""
    table = read_pairs(path).reset_index(drop=True)
    labels = {c: table[c].to_numpy(dtype=float) for c in ("label_0", "label_1")}
    for column, values in labels.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(f"{path}: column {column!r} has NaN/inf at rows {bad[:5].tolist()}")
    off = np.flatnonzero(np.abs(labels["label_0"] + labels["label_1"] - 1) > 1e-6)
    if len(off):
        raise ValueError(f"{path}: label_0 + label_1 != 1 at rows {off[:5].tolist()}")
    empty = [i for i, c in enumerate(table["caption"]) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise ValueError(f"{path}: column 'caption' is empty at rows {empty[:5]}")
    if len(table) < 2:
        raise ValueError(f"{path}: need at least 2 pairs to hold some out, got {len(table)}")
    return table


MAX_PREFETCH_BYTES = 2 * 2**30  # the worker keeps every x̂0 it computed: fine for digits (~35 MB), not for 512 px


def prefetch_bytes(jobs: Sequence[X0Job], resolution: int) -> int:
    """Memory the prefetching worker's results take: two float32 RGB images per pair of every job."""
    return sum(len(job.indices) for job in jobs) * 2 * 3 * resolution**2 * 4


def split_pairs(num_pairs: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded ~10% hold-out (at least 1, at most MAX_EVAL_PAIRS)."""
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = min(MAX_EVAL_PAIRS, max(1, round(EVAL_FRACTION * num_pairs)))
    return sorted(order[num_eval:]), sorted(order[:num_eval])


# ----------------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, *, prepared_dir: Path, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Train the SPM; write out_dir/model/ and out_dir/metrics.json atomically. Returns the metrics."""
    if cfg.model.architecture != "sd15":
        raise NotImplementedError("train_spm: x̂0 inputs from an SDXL base (added text/time embeddings) are not "
                                  "implemented yet (model.architecture=sdxl)")
    spm_cfg = cfg.train_spm
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_factory(spm_cfg.mixed_precision, device)
    pairs_path = prepared_dir / PAIRS_FILE
    table = read_training_pairs(pairs_path)
    load_batch = pair_loader(table, cfg.model.resolution, pairs_path)
    train_idx, eval_idx = split_pairs(len(table), cfg.seed)

    model_location = base_model_location(cfg, prepared_dir)
    model = load_diffusion_model(model_location, vae=cfg.model.vae,
                                 dtype=DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32,
                                 device=device)
    spm = StepAwarePreferenceModel.from_backbone(preference_backbone_location(cfg, prepared_dir),
                                                 cfg.model.preference_processor).to(device).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    metrics: dict[str, float] = {"num_train_pairs": float(len(train_idx)), "num_eval_pairs": float(len(eval_idx))}
    # every x̂0 input is planned now: on a CPU a worker computes them while the preference phase trains here
    eval_jobs = plan_eval_jobs(eval_idx, spm_cfg.eval_timesteps, spm_cfg.batch_size, cfg.seed + 1)
    train_jobs = plan_training_jobs(train_idx, spm_cfg.max_steps, spm_cfg.batch_size,
                                    model.scheduler.config.num_train_timesteps, cfg.seed + 2)
    worker = X0WorkerSpec(model_location, cfg.model.vae, str(pairs_path), cfg.model.resolution, spm_cfg.guidance_scale)
    prefetch = device.type == "cpu" and prefetch_bytes(eval_jobs + train_jobs, cfg.model.resolution) <= MAX_PREFETCH_BYTES
    with (prefetched_source(worker, eval_jobs + train_jobs) if prefetch
          else nullcontext(in_process_source(model, load_batch, spm_cfg.guidance_scale))) as x0_source:

        def clean_accuracy() -> float:  # on the human labels, whatever the training labels are
            return backbone_clean_accuracy(spm, load_batch, eval_idx, batch_size=spm_cfg.batch_size,
                                           autocast=autocast)

        metrics["backbone_accuracy_clean_initial"] = clean_accuracy()
        if spm_cfg.preference_steps > 0:
            losses = train_preference_backbone(spm, load_batch, train_idx, spm_cfg, tracker=tracker,
                                               generator=generator, autocast=autocast)
            metrics["preference_final_loss"] = _tail_mean(losses)
        metrics["backbone_accuracy_clean"] = clean_accuracy()

        if spm_cfg.use_pickscore_labels:
            load_batch = relabelled_by_backbone(load_batch, frozen_copy(spm), spm_cfg.pickscore_label_threshold,
                                                autocast)

        def accuracy_at_eval_timesteps(prefix: str) -> None:
            acc = evaluate_accuracy(spm, load_batch, eval_jobs, x0_source, autocast=autocast)
            metrics.update({f"{prefix}accuracy_t{t}": value for t, value in acc.items()})

        accuracy_at_eval_timesteps("initial_")
        spm_started = time.perf_counter()
        losses = train_spm(spm, load_batch, train_jobs, x0_source, spm_cfg, tracker=tracker, autocast=autocast)
        metrics["spm_train_seconds"] = time.perf_counter() - spm_started
        metrics["final_loss"] = _tail_mean(losses)
        accuracy_at_eval_timesteps("")
    metrics["stage_seconds"] = time.perf_counter() - started

    tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=spm_cfg.max_steps)
    with atomic_dir(out_dir) as tmp:
        spm.cpu().save_pretrained(tmp / "model")
        write_json(tmp / "metrics.json", metrics)
    return metrics


def _tail_mean(values: list[float]) -> float:
    """Mean of the last 10% (at least one) of a loss curve; NaN when empty."""
    if not values:
        return float("nan")
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> None:
    stage_main("train_spm", argv, ["prepared_dir", "out_dir"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, out_dir=args.out_dir,
                                              tracker=tracker))


if __name__ == "__main__":
    main()
