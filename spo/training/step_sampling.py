"""SPO's step-wise sampling: branch k candidates, keep (best, worst) pairs (DESIGN 3.2), SD1.5 and SDXL/MSPO.

Shapes: B prompts, K candidates, latents (C, h, w). Notation as in spo/diffusion/ddim.py. One *chunk*
is `inner_steps + 1` transitions (SD1.5: 1; SDXL's MSPO: 4):

    steps i < branch_start_step: plain DDIM (η) sampling, no pairs (t > 750 for the recipes)
    a chunk starting at step i, from the shared x_t:
        x_{t-1}^k = μ_θ(x_t) + σ_t ε_k              one UNet call serves all K candidates (one shared mean)
        (MSPO) each candidate then takes `inner_steps` more stochastic steps of its own
        ε̂_k = ε_θ(x^k, t')                           one UNet call on B·K candidates at the chunk's end t' ...
        s_k = SPM(decode(x̂_0(x^k)), t')             ... scored at the candidate's own timestep t'
        keep best and worst if softmax(s_best, s_worst) gap > threshold: every transition of both chunks
        becomes a training pair (for MSPO's inner steps the win and lose x_t differ)
        continue from a uniformly random candidate, reusing its ε̂_k for the next chunk's shared mean
    after the last step the candidates are x_0 themselves, scored at t = 0.

Randomness is drawn per prompt, from that prompt's own generator, in this order: the initial noise
(C, h, w); one noise (C, h, w) per plain step; then per chunk the K first-transition noises (K, C, h, w),
one (K, C, h, w) per inner step, and the continuation index randint(K). So a prompt's rollout does not
depend on which prompts share its batch or its process: N processes produce the pairs of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch

from spo.diffusion.conditioning import PromptConditioning
from spo.diffusion.ddim import ddim_step, predict_x0
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel

# score_fn(images in [-1, 1] (N, 3, H, W), prompt_index (N,), timesteps (N,)) -> scores (N,)
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepPairs:
    """Kept training pairs; every tensor has the pair dimension N first.

    SD1.5's pairs share x_t (`latents_t_lose` is None). MSPO's inner transitions start from different
    states, so there it holds the losing chunk's x_t. `step_index` (the transition's index in the
    schedule) and `prompt_index` order pairs canonically across processes."""

    latents_t: torch.Tensor  # (N, C, h, w) x_t (of the winner, or shared)
    latents_win: torch.Tensor  # (N, C, h, w) x_{t-1} of the best candidate
    latents_lose: torch.Tensor  # (N, C, h, w) x_{t-1} of the worst candidate
    timesteps: torch.Tensor  # (N,) t of the transition x_t -> x_{t-1}
    prompt_index: torch.Tensor  # (N,) into the round's prompts
    step_index: torch.Tensor  # (N,) i of the transition in the sampling schedule
    latents_t_lose: torch.Tensor | None = None  # (N, C, h, w) x_t of the loser when it differs (MSPO)

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, index: torch.Tensor) -> StepPairs:
        return StepPairs(**{k: None if v is None else v[index] for k, v in self.tensors().items()})

    def to(self, device: torch.device | str) -> StepPairs:
        return StepPairs(**{k: None if v is None else v.to(device) for k, v in self.tensors().items()})

    def canonical_order(self) -> StepPairs:
        """Sorted by (step_index, prompt_index): the same order whichever process sampled which prompt."""
        key = self.step_index.long() * (int(self.prompt_index.max()) + 1 if len(self) else 1) + self.prompt_index
        return self.select(torch.argsort(key.cpu(), stable=True).to(key.device))

    @staticmethod
    def empty(shape: tuple[int, ...], device: torch.device | str, *, differing_starts: bool) -> StepPairs:
        latents = torch.zeros((0, *shape), device=device)
        index = torch.zeros(0, dtype=torch.long, device=device)
        return StepPairs(latents, latents, latents, index, index, index, latents if differing_starts else None)

    @staticmethod
    def cat(parts: Sequence[StepPairs]) -> StepPairs:
        def join(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                return None
            if name == "latents_t_lose":  # shared x_t stands in for the loser's where a part has none
                values = [p.latents_t if v is None else v for p, v in zip(parts, values)]
            return torch.cat(values)
        return StepPairs(**{f.name: join(f.name) for f in fields(StepPairs)})


@dataclass
class RolloutStats:
    num_candidates_scored: int = 0
    num_comparisons: int = 0
    num_kept: int = 0
    scores: list[torch.Tensor] = field(default_factory=list)  # (B·K,) per scoring, on the CPU
    score_timesteps: list[int] = field(default_factory=list)  # the SPM timestep of each entry of `scores`
    choices: list[torch.Tensor] = field(default_factory=list)  # (B,) continuation index per chunk

    @property
    def kept_pair_rate(self) -> float:
        """Kept comparisons / comparisons (one comparison per prompt and chunk)."""
        return self.num_kept / max(self.num_comparisons, 1)

    def merge(self, other: RolloutStats) -> None:
        self.num_candidates_scored += other.num_candidates_scored
        self.num_comparisons += other.num_comparisons
        self.num_kept += other.num_kept
        self.scores += other.scores
        self.score_timesteps += other.score_timesteps
        self.choices += other.choices


@dataclass(frozen=True)
class RolloutSettings:
    num_inference_steps: int
    eta: float
    guidance_scale: float
    num_candidates: int
    branch_start_step: int
    threshold: float
    inner_steps: int = 0  # MSPO: stochastic steps per candidate after branching, before scoring
    decode_batch_size: int | None = None  # x̂0 images decoded and scored per call (memory); None = all B·K


def select_best_worst(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (B, K) -> best idx (B,), worst idx (B,), keep mask (B,): softmax(best, worst) gap > threshold."""
    best = scores.argmax(dim=1)
    worst = scores.argmin(dim=1)
    pair = torch.stack([scores.gather(1, best[:, None])[:, 0], scores.gather(1, worst[:, None])[:, 0]], dim=1)
    probs = pair.float().softmax(dim=1)
    keep = (probs[:, 0] - probs[:, 1]) > threshold
    return best, worst, keep


def _fp32_scores(model: DiffusionModel, x0_pred: torch.Tensor, prompt_index: torch.Tensor, timesteps: torch.Tensor,
                 score_fn: ScoreFn, batch_size: int | None = None) -> torch.Tensor:
    """Decode (`decode_for_scoring`), then score with autocast off: a bf16 SPM can flip keep/best/worst
    decisions near the threshold (the published rollout scores in fp32). `batch_size` images at a time
    (None: all): the decoder's activations at 1024 px bound SDXL's memory, not the UNet's."""
    off = torch.autocast(model.device.type, enabled=False) if model.device.type in ("cuda", "cpu") else nullcontext()
    step = batch_size or x0_pred.shape[0]
    scores = []
    for start in range(0, x0_pred.shape[0], step):
        rows = slice(start, start + step)
        images = model.decode_for_scoring(x0_pred[rows])
        with off:
            scores.append(score_fn(images.float(), prompt_index[rows], timesteps[rows]).float())
    return torch.cat(scores)


def prompt_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_latents(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) starting noise, row b from generators[b] (its first draw)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def rollout_pairs(model: DiffusionModel, cond: PromptConditioning, uncond: PromptConditioning,
                  settings: RolloutSettings, score_fn: ScoreFn, initial: torch.Tensor,
                  generators: Sequence[torch.Generator],
                  prompt_ids: torch.Tensor | None = None) -> tuple[StepPairs, RolloutStats]:
    """Sample B trajectories with the current UNet and return the kept pairs. cond: B rows, uncond: 1;
    `generators[b]` drives prompt b's noise after `initial` (see the module docstring); `prompt_ids` (B,)
    label the pairs (default 0..B-1) and are what `score_fn` receives as prompt_index."""
    scheduler, unet = model.scheduler, model.unet
    scheduler.set_timesteps(settings.num_inference_steps)
    timesteps = scheduler.timesteps.to(model.device)
    num_steps = len(timesteps)
    b, k, device = initial.shape[0], settings.num_candidates, model.device
    if len(generators) != b:
        raise ValueError(f"rollout_pairs: {len(generators)} generators for {b} prompts")
    prompt_ids = torch.arange(b) if prompt_ids is None else prompt_ids.cpu().long()
    rows_b = torch.arange(b, device=device)
    cond_k = cond.repeat_interleave(k)  # B*K rows, the K candidates of a prompt next to each other
    ids_k = prompt_ids.to(device).repeat_interleave(k)
    latents = initial.float().to(device)
    stats, kept = RolloutStats(), []

    def noise(*shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    def guided(x: torch.Tensor, t: torch.Tensor, c: PromptConditioning) -> torch.Tensor:
        return guided_noise_pred(unet, x, t, c, uncond, settings.guidance_scale)

    for t in timesteps[: settings.branch_start_step]:
        step = ddim_step(scheduler, guided(latents, t, cond), t, latents, settings.eta)
        latents = step.mean + step.sigma * noise(*latents.shape[1:])

    i = settings.branch_start_step
    noise_pred = guided(latents, timesteps[i], cond)
    while i < num_steps:
        end = min(i + settings.inner_steps + 1, num_steps)
        step = ddim_step(scheduler, noise_pred, timesteps[i], latents, settings.eta)  # one mean for K candidates
        current = step.mean[:, None] + step.sigma[:, None] * noise(k, *latents.shape[1:])  # (B, K, ...)
        chain = [(latents[:, None].expand_as(current), current, i)]  # (x_t, x_{t-1}, step index) per transition
        for j in range(i + 1, end):  # MSPO's inner steps: each candidate on its own
            flat = current.flatten(0, 1)
            inner = ddim_step(scheduler, guided(flat, timesteps[j], cond_k), timesteps[j], flat, settings.eta)
            following = (inner.mean + inner.sigma * noise(k, *latents.shape[1:]).flatten(0, 1)).view_as(current)
            chain.append((current, following, j))
            current = following
        flat = current.flatten(0, 1)
        if end < num_steps:  # score x̂0 at the candidates' own timestep; that UNet call also drives the next chunk
            cand_noise = guided(flat, timesteps[end], cond_k)
            x0_pred, score_t = predict_x0(scheduler, cand_noise, timesteps[end], flat), int(timesteps[end])
        else:
            cand_noise, x0_pred, score_t = None, flat, 0
        scores = _fp32_scores(model, x0_pred, ids_k, torch.full((b * k,), score_t, device=device), score_fn,
                              settings.decode_batch_size).view(b, k)
        best, worst, keep = select_best_worst(scores, settings.threshold)
        rows = keep.nonzero()[:, 0]
        for x_t, x_prev, index in chain:
            kept.append(StepPairs(latents_t=x_t[rows, best[rows]], latents_win=x_prev[rows, best[rows]],
                                  latents_lose=x_prev[rows, worst[rows]],
                                  timesteps=timesteps[index].expand(rows.numel()).clone(),
                                  prompt_index=prompt_ids[rows.cpu()].to(device),
                                  step_index=torch.full((rows.numel(),), index, device=device),
                                  latents_t_lose=x_t[rows, worst[rows]] if settings.inner_steps else None))
        stats.num_candidates_scored += b * k
        stats.num_comparisons += b
        stats.num_kept += rows.numel()
        stats.scores.append(scores.flatten().cpu())
        stats.score_timesteps.append(score_t)
        choice = torch.stack([torch.randint(k, (), generator=g) for g in generators]).to(device)  # uniform
        stats.choices.append(choice.cpu())
        latents = current[rows_b, choice]
        if cand_noise is not None:
            noise_pred = cand_noise.view(b, k, *latents.shape[1:])[rows_b, choice]  # the chosen one's own ε̂
        i = end
    return StepPairs.cat(kept), stats
