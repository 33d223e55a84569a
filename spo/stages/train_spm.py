"""Stage `train_spm`: train the step-aware preference model on Pick-a-Pic-format pairs (DESIGN 3.1).

Inputs: the prepared pairs (`prepared_dir/pairs/`, spo.data.prepared_layout) less the rows `validate`
quarantined, the base diffusion model (its one-step x̂0 predictions are the SPM's inputs) and the
preference backbone (hub ids of a real profile, or what `prepare` built for digits), or a checkpoint to
start from (`train_spm.init_from`: the published SPM, with `max_steps: 0` only evaluated and saved).
Outputs, all or nothing: `out_dir/model/` (the SPM, `StepAwarePreferenceModel.save_pretrained`) and
`out_dir/metrics.json` (pairwise accuracy at each eval timestep before and after training, the
backbone's accuracy on clean images, and the published trainer's clean t = 0 accuracy).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config, ConfigError, MissingPathError, flat_params
from spo.data.model_locations import base_model_location, preference_backbone_location
from spo.data.prepared_layout import PAIRS_DIR
from spo.data.quarantine import QUARANTINE_FILE
from spo.models.diffusion_model import load_diffusion_model
from spo.models.published_spm_checkpoint import (
    load_published_state_dict,
    read_checkpoint,
    resolve_checkpoint_file,
)
from spo.models.step_aware_preference_model import (
    SPM_CONFIG_FILE,
    StepAwarePreferenceModel,
)
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy, fingerprint
from spo.training.distributed import barrier, current_processes
from spo.training.spm_inputs import (
    PairsSpec,
    TrainingPairs,
    X0Job,
    X0WorkerSpec,
    check_rows,
    data_digest,
    in_process_source,
    pair_loader,
    plan_eval_jobs,
    plan_training_jobs,
    prefetched_source,
)
from spo.training.spm_training import (
    LoopOptions,
    autocast_factory,
    backbone_clean_accuracy,
    clean_accuracy_metrics,
    evaluate_accuracy,
    frozen_copy,
    relabelled_by_backbone,
    train_preference_backbone,
    train_spm,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_PREFETCH_BYTES = 2 * 2**30  # the worker keeps every x̂0 it computed: fine for digits (~35 MB), not for 512 px


# ----------------------------------------------------------------------------------------------------
# pairs


def prefetch_bytes(jobs: Sequence[X0Job], resolution: int) -> int:
    """Memory the prefetching worker's results take: two float32 RGB images per pair of every job."""
    return sum(len(job.indices) for job in jobs) * 2 * 3 * resolution**2 * 4


# ----------------------------------------------------------------------------------------------------
# the SPM to start from


def initial_spm(cfg: Config, prepared_dir: Path) -> StepAwarePreferenceModel:
    """The identity-initialised SPM on the backbone, or `train_spm.init_from`: an SPM directory of ours, or
    a published checkpoint (hub repo / .bin file / dir holding it) loaded into the backbone's architecture."""
    backbone = preference_backbone_location(cfg, prepared_dir)
    location = cfg.train_spm.init_from
    if location is None:
        return StepAwarePreferenceModel.from_backbone(backbone, cfg.model.preference_processor)
    if cfg.train_spm.preference_steps > 0:
        raise ConfigError("train_spm.init_from and train_spm.preference_steps > 0 conflict: a loaded SPM is "
                          "already trained; set preference_steps: 0")
    if (Path(location).expanduser() / SPM_CONFIG_FILE).is_file():
        return StepAwarePreferenceModel.from_pretrained(Path(location).expanduser())
    spm = StepAwarePreferenceModel.from_backbone(backbone, cfg.model.preference_processor)
    load_published_state_dict(spm, read_checkpoint(resolve_checkpoint_file(location, cfg.model.architecture)))
    return spm


# ----------------------------------------------------------------------------------------------------
# the stage


def run(cfg: Config, *, prepared_dir: Path, out_dir: Path, tracker: Tracker, validate_dir: Path | None = None,
        checkpoint_dir: Path | None = None) -> dict[str, float]:
    """Train the SPM; write out_dir/model/ and out_dir/metrics.json atomically. Returns the metrics.

    Rows `validate` quarantined (validate_dir/quarantine.parquet) are skipped. With `checkpoint_dir`
    and `train_spm.checkpoint_every` > 0 the SPM phase checkpoints and an interrupted run resumes from
    the latest checkpoint of the same run. Under `accelerate launch` every process trains on its own
    batches (spo.training.distributed); the main one writes the outputs."""
    spm_cfg = cfg.train_spm
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    processes = current_processes()
    device = processes.device
    autocast = autocast_factory(spm_cfg.mixed_precision, device)
    pairs_dir = prepared_dir / PAIRS_DIR
    quarantine = validate_dir / QUARANTINE_FILE if validate_dir is not None else None
    if quarantine is not None and not quarantine.is_file():
        raise MissingPathError(f"quarantine file not found: {quarantine} (run the validate stage first)")
    pairs_spec = PairsSpec(str(pairs_dir), str(quarantine) if quarantine else None, cfg.seed)
    pairs = TrainingPairs(pairs_spec)
    check_rows(pairs, pairs_dir)
    load_batch = pair_loader(pairs, cfg.model.resolution)
    train_idx, eval_idx = pairs.train_indices, pairs.eval_indices

    model_location = base_model_location(cfg, prepared_dir)
    model = load_diffusion_model(model_location, vae=cfg.model.vae,
                                 dtype=DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32,
                                 device=device)
    if model.architecture != cfg.model.architecture:
        raise ConfigError(f"model.architecture={cfg.model.architecture} but model.base_model {model_location} is an "
                          f"{model.architecture} pipeline")
    spm = initial_spm(cfg, prepared_dir).to(device).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    # every x̂0 input is planned now: on a CPU a worker computes them while the preference phase trains here;
    # with N processes, process r takes jobs r, r + N, ... (the same global batches for any N)
    world, rank = processes.world_size, processes.rank
    eval_jobs = plan_eval_jobs(eval_idx, spm_cfg.eval_timesteps, spm_cfg.batch_size, cfg.seed + 1)[rank::world]
    train_jobs = plan_training_jobs(train_idx, spm_cfg.max_steps * world, spm_cfg.batch_size,
                                    model.scheduler.config.num_train_timesteps, cfg.seed + 2)[rank::world]
    policy = None
    if checkpoint_dir is not None:
        policy = CheckpointPolicy(Path(checkpoint_dir), spm_cfg.checkpoint_every, fingerprint(
            flat_params(cfg.train_spm), flat_params(cfg.model), cfg.seed, world,
            data_digest(pairs_dir, quarantine)))
    resume = policy.latest() if policy is not None else None
    worker = X0WorkerSpec(model_location, cfg.model.vae, pairs_spec, cfg.model.resolution, spm_cfg.guidance_scale)
    prefetch = device.type == "cpu" and prefetch_bytes(eval_jobs + train_jobs, cfg.model.resolution) <= MAX_PREFETCH_BYTES
    with (prefetched_source(worker, eval_jobs + train_jobs) if prefetch
          else nullcontext(in_process_source(model, load_batch, spm_cfg.guidance_scale))) as x0_source:

        def accuracy_at_eval_timesteps(prefix: str) -> dict[str, float]:
            acc = evaluate_accuracy(spm, load_batch, eval_jobs, x0_source, autocast=autocast,
                                    timesteps=spm_cfg.eval_timesteps)
            return {f"{prefix}accuracy_t{t}": value for t, value in acc.items()}

        if resume is None:
            metrics = {"num_train_pairs": float(len(train_idx)), "num_eval_pairs": float(len(eval_idx)),
                       "num_processes": float(world)}
            metrics |= pretraining_metrics(cfg, spm, load_batch, train_idx, eval_idx, tracker, generator, autocast)
        else:
            metrics = dict(resume["metrics"])
            metrics["resumed_from_step"] = float(resume["step"])
        if spm_cfg.use_pickscore_labels:
            load_batch = relabelled_by_backbone(load_batch, frozen_copy_of_backbone(cfg, prepared_dir, spm, resume,
                                                                                    device),
                                                spm_cfg.pickscore_label_threshold, autocast)
        if resume is None:
            metrics |= accuracy_at_eval_timesteps("initial_")
        spm_started = time.perf_counter()
        losses = train_spm(spm, load_batch, train_jobs, x0_source, spm_cfg, tracker=tracker, autocast=autocast,
                           options=LoopOptions(checkpoints=policy, resume=resume, saved_metrics=metrics))
        metrics["spm_train_seconds"] = time.perf_counter() - spm_started
        metrics["final_loss"] = _tail_mean(losses)
        metrics |= accuracy_at_eval_timesteps("")
        metrics |= clean_accuracy_metrics(spm, load_batch, eval_idx, spm_cfg.batch_size, autocast, prefix="")
    metrics["stage_seconds"] = time.perf_counter() - started

    if processes.is_main:
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=spm_cfg.max_steps)
        with atomic_dir(out_dir) as tmp:
            spm.cpu().save_pretrained(tmp / "model")
            write_json(tmp / "metrics.json", metrics)
        if policy is not None:
            policy.clear()  # the output is written: a rerun starts from it, not from a checkpoint
    barrier()
    return metrics


def pretraining_metrics(cfg: Config, spm: StepAwarePreferenceModel, load_batch, train_idx: list[int],
                        eval_idx: list[int], tracker: Tracker, generator: torch.Generator,
                        autocast) -> dict[str, float]:
    """The backbone's clean accuracy before (and after the optional preference phase, which runs here)."""
    spm_cfg = cfg.train_spm
    metrics = clean_accuracy_metrics(spm, load_batch, eval_idx, spm_cfg.batch_size, autocast, prefix="initial_")
    metrics["backbone_accuracy_clean_initial"] = backbone_clean_accuracy(
        spm, load_batch, eval_idx, batch_size=spm_cfg.batch_size, autocast=autocast)
    if spm_cfg.preference_steps > 0:
        losses = train_preference_backbone(spm, load_batch, train_idx, spm_cfg, tracker=tracker,
                                           generator=generator, autocast=autocast)
        metrics["preference_final_loss"] = _tail_mean(losses)
    metrics["backbone_accuracy_clean"] = backbone_clean_accuracy(spm, load_batch, eval_idx,
                                                                 batch_size=spm_cfg.batch_size, autocast=autocast)
    return metrics


def frozen_copy_of_backbone(cfg: Config, prepared_dir: Path, spm: StepAwarePreferenceModel, resume: dict | None,
                            device: torch.device) -> StepAwarePreferenceModel:
    """The PickScore labeller of the SDXL recipe: the backbone as it is before SPM training. After a resume
    the SPM has trained, so the backbone is reloaded (plus the preference phase is digits-only: refused)."""
    if resume is None:
        return frozen_copy(spm)
    if cfg.train_spm.preference_steps > 0:
        raise ConfigError("resuming with train_spm.use_pickscore_labels and preference_steps > 0 is not supported: "
                          "the labeller (the backbone after the preference phase) is not in the checkpoint")
    return frozen_copy(initial_spm(cfg, prepared_dir).to(device))


def _tail_mean(values: list[float]) -> float:
    """Mean of the last 10% (at least one) of a loss curve; NaN when empty."""
    if not values:
        return float("nan")
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> None:
    stage_main("train_spm", argv, ["prepared_dir", "validate_dir", "out_dir", "checkpoint_dir?"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, validate_dir=args.validate_dir,
                                              out_dir=args.out_dir, checkpoint_dir=args.checkpoint_dir,
                                              tracker=tracker),
               data_parallel=True)


if __name__ == "__main__":
    main()
