"""Stage `train_spo`: fine-tune the base UNet with SPO (SD1.5) or MSPO (SDXL); write the weights and the log.

Output: out_dir/lora (diffusers format, `pipe.load_lora_weights(out_dir / "lora")`), or with
`train_spo.full_finetune` out_dir/lora/unet (a diffusers UNet), plus history.csv and metrics.json.
Under `accelerate launch` every process samples and trains its share (spo.training.spo_trainer); the
main one writes. With a checkpoint dir and `train_spo.checkpoint_every` > 0 an interrupted run resumes
from the newest checkpoint of the same run (or from `--resume-from`).
"""

from __future__ import annotations

import csv
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from spo.atomic_write import atomic_dir, write_json
from spo.config import Config, ConfigError, MissingPathError, flat_params, training_seed
from spo.data.model_locations import base_model_location
from spo.data.prepared_layout import TRAIN_PROMPTS_FILE
from spo.data.prompts import read_prompts
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import save_full_unet, save_lora
from spo.models.scoring_decoder import load_scoring_decoder
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.stages.stage_cli import stage_main
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy, fingerprint
from spo.training.distributed import Processes, barrier, current_processes
from spo.training.learning_curve import CURVE_FILE, learning_curve
from spo.training.spo_trainer import SPORunOptions, num_rounds, train_spo
from spo.training.step_sampling import ScoreFn
from spo.training.trainable_unet import prepare_unet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HISTORY_FIELDS = ("step", "epoch", "round", "loss", "clamped_ratio_win", "clamped_ratio_lose", "ratio_win",
                  "ratio_lose", "clip_fraction", "grad_norm", "lr", "pairs_per_second", "peak_memory_gb",
                  "kept_pair_rate", "num_pairs", "spm_score_mean", "spm_score_std", "pairs_seen", "train_seconds")
CONTINUING_KEYS = ("checkpoint_every", "checkpoint_keep")  # how a run is carried out, not what it computes


def spm_scorer(spm: StepAwarePreferenceModel) -> Callable[[list[str]], ScoreFn]:
    """Bind the SPM to a round's prompts: score_fn(images, prompt_index, timesteps), in fp32."""
    def for_prompts(prompts: list[str]) -> ScoreFn:
        text_embeds = spm.encode_text(prompts)

        def score(images: torch.Tensor, prompt_index: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return spm.score(images.float(), text_embeds[prompt_index], timesteps.long())
        return score
    return for_prompts


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def summarise(history: list[dict[str, float]], seconds: float, rounds: int) -> dict[str, float]:
    if not history:
        return {"optimizer_steps": 0.0, "train_seconds": seconds, "rounds": float(rounds)}
    tail = history[-max(1, len(history) // 10):]

    def tail_mean(key: str) -> float:
        return sum(h[key] for h in tail) / len(tail)
    return {"optimizer_steps": float(len(history)), "rounds": float(rounds), "train_seconds": seconds,
            "final_loss": tail_mean("loss"), "final_ratio_win": tail_mean("ratio_win"),
            "final_ratio_lose": tail_mean("ratio_lose"), "final_clip_fraction": tail_mean("clip_fraction"),
            "mean_kept_pair_rate": sum(h["kept_pair_rate"] for h in history) / len(history),
            "peak_memory_gb": max(h["peak_memory_gb"] for h in history)}


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{p.relative_to(path)}:{p.stat().st_size};" for p in files).encode()).hexdigest()


def checkpoint_policy(cfg: Config, checkpoint_dir: Path, prompts: list[str], spm_dir: Path,
                      model_location: str) -> CheckpointPolicy:
    """Resumable only by the same run: same recipe, model, prompts and SPM (any number of processes)."""
    recipe = {k: v for k, v in flat_params(cfg.train_spo).items() if k not in CONTINUING_KEYS}
    return CheckpointPolicy(Path(checkpoint_dir), cfg.train_spo.checkpoint_every, fingerprint(
        recipe, flat_params(cfg.model), flat_params(cfg.learning_curve), training_seed(cfg, cfg.train_spo), model_location, prompts, _digest(spm_dir)),
        keep=cfg.train_spo.checkpoint_keep, unit="round")


def resume_state(policy: CheckpointPolicy | None, resume_from: Path | None) -> dict | None:
    if resume_from is None:
        return policy.latest() if policy is not None else None
    path = Path(resume_from)
    if path.is_dir():
        found = CheckpointPolicy(path, 1, policy.fingerprint if policy else "", unit="round")
        files = found.steps_on_disk()
        if not files:
            raise MissingPathError(f"--resume-from {path}: no round-NNNNNN.pt checkpoint in it")
        path = found.path(files[-1])
    if not path.is_file():
        raise MissingPathError(f"--resume-from: checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if policy is not None and state.get("fingerprint") != policy.fingerprint:
        raise ConfigError(f"--resume-from {path}: the checkpoint belongs to another run (recipe, model, prompts "
                          "or SPM differ)")
    return state


def run(cfg: Config, *, prepared_dir: Path, spm_dir: Path, out_dir: Path, tracker: Tracker,
        checkpoint_dir: Path | None = None, resume_from: Path | None = None) -> dict[str, float]:
    """Fine-tune with SPO; write out_dir/lora, history.csv and metrics.json atomically (main process)."""
    spo_cfg = cfg.train_spo
    seed = training_seed(cfg, spo_cfg)
    torch.manual_seed(seed)
    processes: Processes = current_processes()
    device = processes.device
    location = base_model_location(cfg, prepared_dir)
    model = load_diffusion_model(location, vae=cfg.model.vae,
                                 dtype=DTYPES[cfg.model.dtype] if device.type == "cuda" else torch.float32, device=device)
    if model.architecture != cfg.model.architecture:
        raise ConfigError(f"model.architecture={cfg.model.architecture} but model.base_model {location} is an "
                          f"{model.architecture} pipeline")
    if spo_cfg.scoring_decoder is not None:  # opt-in fast scoring: only what the SPM sees changes
        model.scoring_decoder = load_scoring_decoder(spo_cfg.scoring_decoder, model.vae, dtype=model.vae.dtype,
                                                     device=device)
    if spo_cfg.channels_last:
        model.to_memory_format(torch.channels_last)
    spm = StepAwarePreferenceModel.from_pretrained(str(spm_dir / "model")).to(device).eval().requires_grad_(False)
    prompts = read_prompts(prepared_dir / TRAIN_PROMPTS_FILE, spo_cfg.max_prompts)
    params, reference = prepare_unet(model, spo_cfg)
    policy = checkpoint_policy(cfg, checkpoint_dir, prompts, spm_dir, location) if checkpoint_dir else None
    resume = resume_state(policy, resume_from)
    rounds = num_rounds(len(prompts), spo_cfg)
    curve = learning_curve(cfg, prepared_dir=Path(prepared_dir), total=rounds, device=device, tracker=tracker,
                           is_main=processes.is_main)
    tracker.log_params({**flat_params(spo_cfg, "train_spo."), "train_spo.num_prompts": len(prompts),
                        "train_spo.trainable_params": sum(p.numel() for p in params),
                        "train_spo.num_processes": processes.world_size,
                        "train_spo.micro_batches_per_step":
                            -(-(spo_cfg.pairs_per_step // processes.world_size) // spo_cfg.pairs_per_batch)})
    start = time.perf_counter()
    history = train_spo(model, spm_scorer(spm), prompts, params, spo_cfg, resolution=cfg.model.resolution,
                        seed=seed, tracker=tracker,
                        options=SPORunOptions(processes=processes, checkpoints=policy, resume=resume,
                                              reference=reference, curve=curve))
    metrics = summarise(history, time.perf_counter() - start - curve.seconds_spent, rounds)
    metrics["curve_seconds"] = curve.seconds_spent
    metrics["num_processes"] = float(processes.world_size)
    if resume is not None:
        metrics["resumed_from_round"] = float(resume["round"])
    if processes.is_main:
        with atomic_dir(out_dir) as tmp:
            if spo_cfg.full_finetune:
                save_full_unet(model.unet, tmp / "lora")
            else:
                save_lora(model.unet, tmp / "lora", architecture=model.architecture)
            write_history(tmp / "history.csv", history)
            curve.write(tmp / CURVE_FILE)
            write_json(tmp / "metrics.json", metrics)
        tracker.log_metrics({f"train_spo.{k}": v for k, v in metrics.items()})
        if policy is not None:
            policy.clear()  # the output is written: a rerun starts from it, not from a checkpoint
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    stage_main("train_spo", argv, ["prepared_dir", "spm_dir", "out_dir", "checkpoint_dir?", "resume_from?"],
               lambda cfg, args, tracker: run(cfg, prepared_dir=args.prepared_dir, spm_dir=args.spm_dir,
                                              out_dir=args.out_dir, tracker=tracker,
                                              checkpoint_dir=args.checkpoint_dir, resume_from=args.resume_from),
               data_parallel=True)


if __name__ == "__main__":
    main()
