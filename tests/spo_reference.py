"""Independent re-implementations of SPO's rollout and loss, written the slow, obvious way, for the tests.

One prompt and one candidate at a time; the DDIM transitions and x̂0 come from diffusers' own
`DDIMScheduler.step` (with the candidate's noise passed as `variance_noise`), CFG from two separate UNet
calls, the keep rule from `math.exp`, log-densities from `torch.distributions.Normal`. Nothing here calls
spo.training or spo.diffusion code; it replays the rollout's documented draw order per prompt
(spo/training/step_sampling.py): initial noise, one noise per plain step, then per chunk K
first-transition noises, K per inner step, and the continuation index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


@dataclass
class NaivePair:
    prompt: int
    step_index: int
    timestep: int
    x_t_win: torch.Tensor
    x_t_lose: torch.Tensor
    x_win: torch.Tensor
    x_lose: torch.Tensor


@dataclass
class NaiveRollout:
    pairs: list[NaivePair] = field(default_factory=list)
    scores: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # (prompt, chunk) -> K scores
    choices: dict[tuple[int, int], int] = field(default_factory=dict)


def cfg_eps(unet, x, t, cond_row, uncond_row, scale):
    """ε_uncond + s (ε_cond − ε_uncond), two separate calls on one sample. *_row: UNet kwargs of 1 row."""
    t = torch.as_tensor(t).reshape(1)
    e_u = unet(x[None], t, **uncond_row).sample[0].float()
    e_c = unet(x[None], t, **cond_row).sample[0].float()
    return e_u + scale * (e_c - e_u)


def keeps(best: float, worst: float, threshold: float) -> bool:
    p_best = math.exp(best) / (math.exp(best) + math.exp(worst))
    return p_best - (1 - p_best) > threshold


def naive_rollout(model, cond_rows, uncond_row, *, steps, eta, scale, k, branch, inner, threshold, scorer,
                  seeds, shape) -> NaiveRollout:
    """cond_rows[b]: UNet kwargs of prompt b; scorer(image (3, H, W), prompt b, timestep) -> float."""
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    out = NaiveRollout()
    with torch.no_grad():
        for b, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g)

            def eps(sample, t, b=b):
                return cfg_eps(model.unet, sample, t, cond_rows[b], uncond_row, scale)

            def step(e, t, sample, noise):
                return sched.step(e[None], t, sample[None], eta=eta, variance_noise=noise[None])

            for i in range(branch):
                x = step(eps(x, ts[i]), ts[i], x, torch.randn(shape, generator=g)).prev_sample[0]
            i, e, chunk = branch, eps(x, ts[branch]), 0
            while i < steps:
                end = min(i + inner + 1, steps)
                noises = torch.randn((k, *shape), generator=g)
                cands = [step(e, ts[i], x, noises[c]).prev_sample[0] for c in range(k)]
                chains = [[(x, cands[c], i)] for c in range(k)]
                for j in range(i + 1, end):
                    noises = torch.randn((k, *shape), generator=g)
                    for c in range(k):
                        new = step(eps(cands[c], ts[j]), ts[j], cands[c], noises[c]).prev_sample[0]
                        chains[c].append((cands[c], new, j))
                        cands[c] = new
                if end < steps:
                    cand_eps = [eps(c, ts[end]) for c in cands]
                    x0s = [step(ce, ts[end], c, torch.zeros(shape)).pred_original_sample[0]
                           for ce, c in zip(cand_eps, cands)]
                    score_t = ts[end]
                else:
                    cand_eps, x0s, score_t = None, cands, 0
                scores = [float(scorer(decode(model, x0), b, score_t)) for x0 in x0s]
                out.scores[(b, chunk)] = scores
                best = max(range(k), key=lambda c: scores[c])
                worst = min(range(k), key=lambda c: scores[c])
                if keeps(scores[best], scores[worst], threshold):
                    for (xt_w, xw, idx), (xt_l, xl, _) in zip(chains[best], chains[worst]):
                        out.pairs.append(NaivePair(b, idx, ts[idx], xt_w, xt_l, xw, xl))
                choice = int(torch.randint(k, (), generator=g))
                out.choices[(b, chunk)] = choice
                x = cands[choice]
                if cand_eps is not None:
                    e = cand_eps[choice]
                i, chunk = end, chunk + 1
    return out


def decode(model, latents):
    image = model.vae.decode(latents[None].to(model.vae.dtype) / model.vae.config.scaling_factor).sample[0]
    return image.float().clamp(-1, 1)


def naive_log_prob(sched: DDIMScheduler, unet, x_t, x_prev, t, cond_row, uncond_row, scale, eta):
    """log N(x_prev; μ(x_t), σ_t²) averaged over elements, μ from diffusers' step with zero noise."""
    e = cfg_eps(unet, x_t, t, cond_row, uncond_row, scale)
    mean = sched.step(e[None], t, x_t[None], eta=eta, variance_noise=torch.zeros_like(x_t)[None]).prev_sample[0]
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    sigma = eta * sched._get_variance(t, prev_t) ** 0.5
    return torch.distributions.Normal(mean, sigma).log_prob(x_prev).mean()


def naive_spo_loss(policy_w, policy_l, ref_w, ref_l, beta, eps):
    """Mean over pairs of −log σ(β log clamp(r_w) − β log clamp(r_l)), from per-pair scalars."""
    losses = []
    for pw, pl, rw, rl in zip(policy_w, policy_l, ref_w, ref_l):
        r_w = torch.clamp(torch.exp(pw - rw), 1 - eps, 1 + eps)
        r_l = torch.clamp(torch.exp(pl - rl), 1 - eps, 1 + eps)
        losses.append(-F.logsigmoid(beta * torch.log(r_w) - beta * torch.log(r_l)))
    return torch.stack(losses).mean()
