"""Stage `train_dpo`: the Diffusion-DPO baseline (DESIGN 3.3) on the same prepared pairs SPO's SPM learnt
from, so one pipeline run compares base, SPO and DPO side by side.

Output (out_dir, all or nothing): lora/ (a diffusers LoRA, or with `train_dpo.full_finetune` lora/unet, a
full UNet), history.csv (one row per optimizer step: loss, implicit accuracy, reward margin, the four
denoising errors, pairs seen, training seconds), curve.csv (the learning curve) and metrics.json. With
`train_dpo.enabled: false` it writes lora/disabled.json instead and evaluate/register leave DPO out.
Checkpoints and resume, accelerate data parallel and the progress bar work as in `train_spo`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config, ConfigError, MissingPathError, flat_params, training_seed
from spo.data.model_locations import base_model_location
from spo.data.prepared_layout import PAIRS_DIR
from spo.data.quarantine import QUARANTINE_FILE
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import DISABLED_FILE, save_full_unet, save_lora
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy, fingerprint
from spo.training.distributed import barrier, current_processes
from spo.training.dpo_trainer import HISTORY_FIELDS, DPORunOptions, decided_pairs, learning_rate, train_dpo
from spo.training.learning_curve import CURVE_FILE, learning_curve
from spo.training.spm_inputs import PairsSpec, TrainingPairs, check_rows, data_digest, pair_loader
from spo.training.trainable_unet import prepare_unet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTINUING_KEYS = ("checkpoint_every", "checkpoint_keep")  # how a run is carried out, not what it computes


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def summarise(history: list[dict[str, float]], wall_seconds: float) -> dict[str, float]:
    tail = history[-max(1, len(history) // 10):]

    def tail_mean(key: str) -> float:
        return sum(h[key] for h in tail) / len(tail)
    return {"optimizer_steps": float(len(history)), "train_seconds": history[-1]["train_seconds"],
            "wall_seconds": wall_seconds, "pairs_seen": history[-1]["pairs_seen"], "final_loss": tail_mean("loss"),
            "final_implicit_accuracy": tail_mean("implicit_accuracy"),
            "final_reward_margin": tail_mean("reward_margin"),
            "peak_memory_gb": max(h["peak_memory_gb"] for h in history)}


def write_disabled(out_dir: Path) -> dict[str, float]:
    reason = "train_dpo.enabled is false: no DPO model in this run (evaluate and register leave it out)"
    with atomic_dir(out_dir) as tmp:
        (tmp / "lora").mkdir()
        write_json(tmp / "lora" / DISABLED_FILE, {"disabled": reason})
        write_history(tmp / "history.csv", [])
        (tmp / CURVE_FILE).write_text("point,position,step,train_seconds,pairs_seen,score\n")
        write_json(tmp / "metrics.json", {"enabled": 0.0})
    return {"enabled": 0.0}


def run(cfg: Config, *, prepared_dir: Path, out_dir: Path, tracker: Tracker, validate_dir: Path | None = None,
        checkpoint_dir: Path | None = None) -> dict[str, float]:
    """Fine-tune with Diffusion-DPO; write out_dir atomically (main process)."""
    dpo = cfg.train_dpo
    processes = current_processes()
    if not dpo.enabled:
        if processes.is_main:
            tracker.log_params({"train_dpo.enabled": False})
            write_disabled(out_dir)
        barrier()
        return {"enabled": 0.0}
    seed = training_seed(cfg, dpo)
    torch.manual_seed(seed)  # the LoRA's initial A
    device = processes.device
    location = base_model_location(cfg, Path(prepared_dir))
    model = load_diffusion_model(location, vae=cfg.model.vae,
                                 dtype=DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32, device=device)
    if model.architecture != cfg.model.architecture:
        raise ConfigError(f"model.architecture={cfg.model.architecture} but model.base_model {location} is an "
                          f"{model.architecture} pipeline")
    pairs_dir = Path(prepared_dir) / PAIRS_DIR
    quarantine = Path(validate_dir) / QUARANTINE_FILE if validate_dir is not None else None
    if quarantine is not None and not quarantine.is_file():
        raise MissingPathError(f"quarantine file not found: {quarantine} (run the validate stage first)")
    table = TrainingPairs(PairsSpec(str(pairs_dir), str(quarantine) if quarantine else None, cfg.seed))
    check_rows(table, pairs_dir)
    pairs = decided_pairs(table)
    params, reference = prepare_unet(model, dpo)
    policy = None
    if checkpoint_dir is not None:
        recipe = {k: v for k, v in flat_params(dpo).items() if k not in CONTINUING_KEYS}
        policy = CheckpointPolicy(Path(checkpoint_dir), dpo.checkpoint_every, fingerprint(
            recipe, flat_params(cfg.model), flat_params(cfg.learning_curve), seed, location,
            data_digest(pairs_dir, quarantine)), keep=dpo.checkpoint_keep, unit="step")
    resume = policy.latest() if policy is not None else None
    curve = learning_curve(cfg, prepared_dir=Path(prepared_dir), total=dpo.max_steps, device=device,
                           tracker=tracker, is_main=processes.is_main)
    tracker.log_params({**flat_params(dpo, "train_dpo."), "train_dpo.decided_pairs": pairs.num_pairs,
                        "train_dpo.ties_dropped": pairs.num_ties, "train_dpo.effective_learning_rate": learning_rate(dpo),
                        "train_dpo.trainable_params": sum(p.numel() for p in params),
                        "train_dpo.num_processes": processes.world_size})
    start = time.perf_counter()
    history = train_dpo(model, pair_loader(table, cfg.model.resolution), pairs, params, dpo,
                        resolution=cfg.model.resolution, seed=seed, tracker=tracker,
                        options=DPORunOptions(processes=processes, checkpoints=policy, resume=resume,
                                              reference=reference, curve=curve))
    metrics = {**summarise(history, time.perf_counter() - start - curve.seconds_spent),
               "decided_pairs": float(pairs.num_pairs), "ties_dropped": float(pairs.num_ties),
               "num_processes": float(processes.world_size), "curve_seconds": curve.seconds_spent}
    if resume is not None:
        metrics["resumed_from_step"] = float(resume["step"])
    if processes.is_main:
        with atomic_dir(out_dir) as tmp:
            if dpo.full_finetune:
                save_full_unet(model.unet, tmp / "lora")
            else:
                save_lora(model.unet, tmp / "lora", architecture=model.architecture)
            write_history(tmp / "history.csv", history)
            curve.write(tmp / CURVE_FILE)
            write_json(tmp / "metrics.json", metrics)
        tracker.log_metrics({f"train_dpo.{k}": v for k, v in metrics.items()})
        if policy is not None:
            policy.clear()
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    stage_main("train_dpo", argv, ["prepared_dir", "out_dir", "validate_dir?", "checkpoint_dir?"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, out_dir=args.out_dir,
                                              tracker=tracker, validate_dir=args.validate_dir,
                                              checkpoint_dir=args.checkpoint_dir),
               data_parallel=True)


if __name__ == "__main__":
    main()
