"""The SPO training loop: rollout -> gather and share out pairs -> optimizer steps -> log, a round at a time.

SD1.5's win and lose share x_t, so μ_θ(x_t) is the same for both: one policy UNet call and one reference
call (the LoRA switched off) per micro-batch, each at CFG batch 2, instead of the published four. MSPO's
inner transitions start from different x_t: there win and lose go through the UNet in one batched call.

Data parallel (DESIGN 3.2, as published): each process rolls out its share of the round's prompts; the
kept pairs are gathered, put in a canonical order, permuted with the round's seed, and dealt out evenly
(the remainder dropped; a round with fewer pairs than processes is skipped). Every random draw is planned
from (seed, round, prompt), so N processes take the optimizer steps of one with the same global batch,
and a resumed run the steps of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from spo.config import TrainSPOConfig
from spo.diffusion.conditioning import PromptConditioning
from spo.diffusion.ddim import ddim_step, gaussian_log_prob
from spo.diffusion.guidance import guided_noise_pred
from spo.diffusion.sampling import latent_shape
from spo.models.diffusion_model import DiffusionModel
from spo.tracking.progress import progress
from spo.tracking.tracker import Tracker
from spo.training.checkpoints import CheckpointPolicy
from spo.training.distributed import Processes, average_gradients, gather_rows, global_sum
from spo.training.learning_curve import LearningCurve
from spo.training.spo_loss import spo_loss
from spo.training.step_sampling import (
    RolloutSettings,
    RolloutStats,
    ScoreFn,
    StepPairs,
    initial_latents,
    prompt_generators,
    rollout_pairs,
)
from spo.training.trainable_unet import ReferenceFn, lora_reference

ONE_PROCESS = Processes(rank=0, world_size=1, device=torch.device("cpu"))
SCORE_BUCKET = 250  # SPM score statistics per timestep bucket [0, 250), [250, 500), ...


@dataclass
class PairLogProbs:
    policy_win: torch.Tensor  # (N,) with grad
    policy_lose: torch.Tensor
    ref_win: torch.Tensor  # (N,) no grad
    ref_lose: torch.Tensor


def rollout_settings(cfg: TrainSPOConfig) -> RolloutSettings:
    return RolloutSettings(num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                           num_candidates=cfg.num_candidates, branch_start_step=cfg.branch_start_step,
                           threshold=cfg.threshold, inner_steps=cfg.inner_steps,
                           decode_batch_size=cfg.decode_batch_size)


def pair_log_probs(model: DiffusionModel, pairs: StepPairs, cond: PromptConditioning, uncond: PromptConditioning,
                   cfg: TrainSPOConfig, reference: ReferenceFn | None = None) -> PairLogProbs:
    """log p(x_win | x_t) and log p(x_lose | x_lose_t) under the policy and the reference (cond: N rows),
    in fp32 whatever the UNet's precision. Shared x_t: one UNet call each; MSPO: win and lose batched."""
    if model.scheduler.num_inference_steps != cfg.num_inference_steps:  # t_prev = t - 1000 / steps
        model.scheduler.set_timesteps(cfg.num_inference_steps)
    shared = pairs.latents_t_lose is None
    x_t = pairs.latents_t if shared else torch.cat([pairs.latents_t, pairs.latents_t_lose])
    t = pairs.timesteps if shared else pairs.timesteps.repeat(2)
    c = cond if shared else cond.repeat(2)

    def log_probs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        noise_pred = guided_noise_pred(unet, x_t, t, c, uncond, cfg.guidance_scale)
        step = ddim_step(model.scheduler, noise_pred.float(), t, x_t.float(), cfg.eta)
        mean_win, mean_lose = (step.mean, step.mean) if shared else step.mean.chunk(2)
        sigma_win, sigma_lose = (step.sigma, step.sigma) if shared else step.sigma.chunk(2)
        return (gaussian_log_prob(pairs.latents_win.float(), mean_win, sigma_win),
                gaussian_log_prob(pairs.latents_lose.float(), mean_lose, sigma_lose))

    policy_win, policy_lose = log_probs(model.unet)
    with torch.no_grad(), (reference or lora_reference(model))() as ref_unet:
        ref_win, ref_lose = log_probs(ref_unet)
    return PairLogProbs(policy_win, policy_lose, ref_win, ref_lose)


@dataclass
class StepContext:
    """What an optimizer step needs besides the pairs: the optimisation state and the precision."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], AbstractContextManager]
    reference: ReferenceFn | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    processes: Processes = ONE_PROCESS


def train_step(model: DiffusionModel, pairs: StepPairs, cond: PromptConditioning, uncond: PromptConditioning,
               cfg: TrainSPOConfig, ctx: StepContext) -> dict[str, float]:
    """One optimizer step over this process's `pairs`, in micro-batches of `pairs_per_batch` (gradient
    accumulation), gradients averaged over processes (each holds as many pairs: the global mean loss).
    Logs are global: loss, clamped and raw ratios, clip fraction, grad norm before clipping, lr."""
    start = time.perf_counter()
    ctx.optimizer.zero_grad(set_to_none=True)
    total = len(pairs)
    sums = torch.zeros(7, dtype=torch.float64)  # loss, clamped win/lose, raw win/lose, clipped ratios, pairs
    for micro in torch.arange(total).split(cfg.pairs_per_batch):
        batch = pairs.select(micro.to(pairs.timesteps.device))
        with ctx.autocast():
            lp = pair_log_probs(model, batch, cond[batch.prompt_index], uncond, cfg, ctx.reference)
        out = spo_loss(lp.policy_win, lp.policy_lose, lp.ref_win, lp.ref_lose, beta=cfg.beta, clip_eps=cfg.clip_eps)
        loss = out.loss * len(micro) / total  # micro-batches weighted by their share: the mean over all pairs
        (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        sums += torch.tensor([out.loss.item() * len(micro), out.clamped_ratio_win.sum().item(),
                              out.clamped_ratio_lose.sum().item(), out.ratio_win.sum().item(),
                              out.ratio_lose.sum().item(),
                              (out.clipped_win.sum() + out.clipped_lose.sum()).item(), len(micro)],
                             dtype=torch.float64)
    average_gradients(ctx.params)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, limit)  # a list: the published clip saw an empty iterator
    lr = ctx.optimizer.param_groups[0]["lr"]
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    sums = global_sum(sums.to(ctx.processes.device)).cpu()
    n = max(sums[6].item(), 1.0)
    return {"loss": sums[0].item() / n, "clamped_ratio_win": sums[1].item() / n,
            "clamped_ratio_lose": sums[2].item() / n, "ratio_win": sums[3].item() / n, "ratio_lose": sums[4].item() / n,
            "clip_fraction": sums[5].item() / (2 * n), "grad_norm": float(grad_norm), "lr": float(lr),
            "pairs_per_second": n / max(time.perf_counter() - start, 1e-9)}


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainSPOConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainSPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant (the recipe), after an optional linear warmup of `lr_warmup_steps` optimizer steps."""
    warmup = cfg.lr_warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


# ----------------------------------------------------------------------------------------------------
# the plan: which prompts a round has, which process samples which, the seeds of every draw


def prompt_rounds(prompts: list[str], cfg: TrainSPOConfig, seed: int) -> Iterator[tuple[int, list[str]]]:
    """(epoch, prompts of one round, over all processes): each epoch shuffles the prompt list."""
    rng = random.Random(seed)
    for epoch in range(cfg.num_epochs):
        order = list(prompts)
        rng.shuffle(order)
        for start in range(0, len(order), cfg.prompts_per_round):
            yield epoch, order[start:start + cfg.prompts_per_round]


def num_rounds(num_prompts: int, cfg: TrainSPOConfig) -> int:
    return cfg.num_epochs * math.ceil(num_prompts / cfg.prompts_per_round)


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed for one purpose (e.g. seed, round, prompt): independent streams, no shared state."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def local_prompt_ids(num_prompts: int, processes: Processes) -> torch.Tensor:
    """This process's share of a round's prompts (round-robin by rank)."""
    return torch.arange(num_prompts)[processes.rank::processes.world_size]


def pairs_per_process_step(cfg: TrainSPOConfig, processes: Processes) -> int:
    if cfg.pairs_per_step % processes.world_size:
        raise ValueError(f"train_spo.pairs_per_step ({cfg.pairs_per_step}) must be a multiple of the number of "
                         f"processes ({processes.world_size}) for every process to take an equal share of a step")
    return cfg.pairs_per_step // processes.world_size


def share_out(pairs: StepPairs, processes: Processes, seed: int) -> StepPairs:
    """All processes' pairs (gathered, canonical order) -> this process's share, as published: a random
    permutation, total // world each (remainder dropped). Dealt round-robin, so optimizer step s of
    process r holds pairs of the permutation's step-s block: N processes step exactly as one."""
    total = len(pairs)
    per_process = total // processes.world_size
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:per_process * processes.world_size]
    return pairs.select(perm[processes.rank::processes.world_size].to(pairs.timesteps.device))


def gather_pairs(pairs: StepPairs, processes: Processes) -> StepPairs:
    if not processes.distributed:
        return pairs.canonical_order()
    gathered = {k: None if v is None else gather_rows(v.contiguous()) for k, v in pairs.tensors().items()}
    return StepPairs(**gathered).canonical_order()


def score_statistics(stats: RolloutStats, processes: Processes) -> dict[str, float]:
    """Mean and std of every SPM score of the round (all processes), overall and per timestep bucket."""
    device = processes.device
    scores = torch.cat(stats.scores) if stats.scores else torch.zeros(0)
    steps = torch.cat([torch.full((len(s),), t) for s, t in zip(stats.scores, stats.score_timesteps)]) \
        if stats.scores else torch.zeros(0, dtype=torch.long)
    scores = gather_rows(scores.to(device)).cpu()
    steps = gather_rows(steps.to(device)).cpu()
    out = {"spm_score_mean": scores.mean().item() if len(scores) else 0.0,
           "spm_score_std": scores.std().item() if len(scores) > 1 else 0.0}
    for bucket in sorted(set((steps // SCORE_BUCKET).tolist())):
        chosen = scores[steps // SCORE_BUCKET == bucket]
        name = f"t{bucket * SCORE_BUCKET}"
        out[f"spm_score_mean_{name}"] = chosen.mean().item()
        out[f"spm_score_std_{name}"] = chosen.std().item() if len(chosen) > 1 else 0.0
    return out


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def autocast_for(cfg: TrainSPOConfig, device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16/fp16 autocast on CUDA as asked; fp32 on the CPU (half matmuls are slower there)."""
    if device.type == "cuda" and cfg.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return nullcontext


# ----------------------------------------------------------------------------------------------------
# the loop


@dataclass
class SPORunOptions:
    """How a run is carried out beyond the recipe: processes, checkpoints, a resume, the reference."""

    processes: Processes = ONE_PROCESS
    checkpoints: CheckpointPolicy | None = None
    resume: dict | None = None  # a checkpoint's state (CheckpointPolicy.latest) to continue from
    reference: ReferenceFn | None = None  # None: the LoRA-disabled UNet
    curve: LearningCurve | None = None  # measured before the first round and after the planned ones
    history: list[dict[str, float]] = field(default_factory=list)  # appended to, one row per optimizer step


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate needs the tuples that a checkpoint round trip may have turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def rollout_round(model: DiffusionModel, cond: PromptConditioning, uncond: PromptConditioning, cfg: TrainSPOConfig,
                  score_fn: ScoreFn, *, resolution: int, seed: int, round_idx: int,
                  processes: Processes, autocast: Callable[[], AbstractContextManager]) -> tuple[StepPairs, RolloutStats]:
    """This process's prompts of a round (`cond`: all of the round's prompts), in sampling batches of
    `prompts_per_rollout`; each prompt's noise from its own (seed, round, prompt) generator."""
    ids = local_prompt_ids(len(cond), processes)
    shape = latent_shape(model, resolution)
    parts, stats = [], RolloutStats()
    for batch in (b for b in ids.split(cfg.prompts_per_rollout) if len(b)):  # an empty split yields one empty part
        generators = prompt_generators([derived_seed(seed, "rollout", round_idx, int(i)) for i in batch])
        init = initial_latents(generators, shape)
        with autocast():
            pairs, part_stats = rollout_pairs(model, cond[batch.to(model.device)], uncond, rollout_settings(cfg),
                                              score_fn, init, generators, prompt_ids=batch)
        parts.append(pairs)
        stats.merge(part_stats)
    if not parts:  # more processes than the (last) round has prompts: nothing to sample here
        return StepPairs.empty(shape, model.device, differing_starts=cfg.inner_steps > 0), stats
    return StepPairs.cat(parts), stats


def train_spo(model: DiffusionModel, score_fn_for: Callable[[list[str]], ScoreFn], prompts: list[str],
              params: list[torch.nn.Parameter], cfg: TrainSPOConfig, *, resolution: int, seed: int,
              tracker: Tracker, options: SPORunOptions | None = None) -> list[dict[str, float]]:
    """Run every round; `score_fn_for(prompts)` binds the SPM to a round's prompts (prompt_index indexes
    them). Returns the history (one row per optimizer step). With `options.resume` the rounds before the
    checkpoint's are skipped: their prompts, seeds and draws are planned, so nothing else is needed."""
    options = options or SPORunOptions()
    procs = options.processes
    per_step = pairs_per_process_step(cfg, procs)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" and model.device.type == "cuda" else None
    optimizer = make_optimizer(params, cfg)
    ctx = StepContext(params, optimizer, make_scheduler(optimizer, cfg), autocast_for(cfg, model.device),
                      options.reference, scaler, procs)
    history, step, first_round = options.history, 0, 0
    train_seconds, pairs_seen, curve = 0.0, 0, options.curve
    if options.resume is not None:
        state = options.resume
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved.to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        ctx.scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history[:] = list(state["history"])
        step, first_round = int(state["optimizer_steps"]), int(state["round"])
        train_seconds, pairs_seen = float(state.get("train_seconds", 0.0)), int(state.get("pairs_seen", 0))
        if curve is not None:
            curve.rows[:] = list(state.get("curve", []))
    uncond = model.encode_negative(resolution)
    total_rounds = num_rounds(len(prompts), cfg)
    if curve is not None:
        curve.maybe_measure(model, first_round, step=step, train_seconds=train_seconds, pairs_seen=pairs_seen,
                            is_main=procs.is_main)
    bar = progress(prompt_rounds(prompts, cfg, seed), desc="train_spo", total=total_rounds, unit="round")
    for round_idx, (epoch, round_prompts) in enumerate(bar):
        if round_idx < first_round:
            continue
        round_start = time.perf_counter()
        cond = model.encode_prompts(round_prompts, resolution)
        model.unet.eval()
        local, stats = rollout_round(model, cond, uncond, cfg, score_fn_for(round_prompts), resolution=resolution,
                                     seed=seed, round_idx=round_idx, processes=procs, autocast=ctx.autocast)
        pairs = gather_pairs(local, procs)
        counts = global_sum(torch.tensor([stats.num_kept, stats.num_comparisons], device=procs.device)).cpu()
        round_logs = {"kept_pair_rate": counts[0].item() / max(counts[1].item(), 1), "num_pairs": float(len(pairs)),
                      **score_statistics(stats, procs)}
        if procs.is_main:
            tracker.log_metrics(round_logs, step=step)
        model.unet.train()
        if len(pairs) >= procs.world_size:  # as published: too few pairs to share out, skip the round
            mine = share_out(pairs, procs, derived_seed(seed, "share", round_idx))
            for chunk in torch.arange(len(mine)).split(per_step):
                logs = train_step(model, mine.select(chunk.to(mine.timesteps.device)), cond, uncond, cfg, ctx)
                logs["peak_memory_gb"] = peak_memory_gb(model.device)
                step += 1
                pairs_seen += len(chunk) * procs.world_size
                logs["pairs_seen"] = float(pairs_seen)
                logs["train_seconds"] = train_seconds + time.perf_counter() - round_start
                if procs.is_main:
                    tracker.log_metrics(logs, step=step)
                history.append({"step": step, "epoch": epoch, "round": round_idx, **logs,
                                "kept_pair_rate": round_logs["kept_pair_rate"], "num_pairs": round_logs["num_pairs"],
                                "spm_score_mean": round_logs["spm_score_mean"],
                                "spm_score_std": round_logs["spm_score_std"]})
        bar.set_postfix(epoch=epoch, kept=f"{round_logs['kept_pair_rate']:.2f}", step=step,
                        loss=f"{history[-1]['loss']:.4f}" if history else "-", refresh=False)
        done = round_idx + 1
        train_seconds += time.perf_counter() - round_start
        if curve is not None:
            curve.maybe_measure(model, done, step=step, train_seconds=train_seconds, pairs_seen=pairs_seen,
                                is_main=procs.is_main)
        if options.checkpoints is not None and options.checkpoints.due(done, total_rounds) and procs.is_main:
            options.checkpoints.save(done, {
                "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                "scheduler": ctx.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "rng": _rng_state(), "history": list(history), "optimizer_steps": step, "round": done,
                "train_seconds": train_seconds, "pairs_seen": pairs_seen,
                "curve": list(curve.rows) if curve is not None else []})
    model.unet.eval()
    return history
