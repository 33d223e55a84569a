"""The SPO loss (DESIGN 3.2; SPO eq. 5 with the published code's clamped ratio).

For a kept pair sharing x_t, with x_w / x_l the winning / losing x_{t-1}:
    r_w = clamp(exp(log p_θ(x_w|x_t) − log p_ref(x_w|x_t)), 1 − eps, 1 + eps)     (r_l likewise)
    loss = −log σ(β·log r_w − β·log r_l)
At init (θ = ref) the loss is ln 2; outside [1 − eps, 1 + eps] the clamp stops the gradient, so the
loss can not fall below −log σ(β·log((1 + eps)/(1 − eps))) ≈ 0.126 for β = 10, eps = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SPOLossOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    ratio_win: torch.Tensor  # (N,) unclamped p_θ/p_ref of the winner, for logging
    ratio_lose: torch.Tensor  # (N,)
    clamped_ratio_win: torch.Tensor  # (N,) the ratio the loss saw
    clamped_ratio_lose: torch.Tensor  # (N,)
    clipped_win: torch.Tensor  # (N,) bool: outside [1 - eps, 1 + eps], so no gradient through it
    clipped_lose: torch.Tensor  # (N,)


def spo_loss(logp_win: torch.Tensor, logp_lose: torch.Tensor, ref_logp_win: torch.Tensor,
             ref_logp_lose: torch.Tensor, *, beta: float, clip_eps: float) -> SPOLossOutput:
    """All inputs (N,) per-pair log-probs (mean over latent elements); ref ones carry no gradient."""
    log_ratio_win = logp_win - ref_logp_win.detach()
    log_ratio_lose = logp_lose - ref_logp_lose.detach()
    ratio_win = torch.clamp(log_ratio_win.exp(), 1 - clip_eps, 1 + clip_eps)
    ratio_lose = torch.clamp(log_ratio_lose.exp(), 1 - clip_eps, 1 + clip_eps)
    margin = beta * (ratio_win.log() - ratio_lose.log())
    loss = -F.logsigmoid(margin).mean()
    raw_win, raw_lose = log_ratio_win.detach().exp(), log_ratio_lose.detach().exp()
    return SPOLossOutput(loss=loss, ratio_win=raw_win, ratio_lose=raw_lose, clamped_ratio_win=ratio_win.detach(),
                         clamped_ratio_lose=ratio_lose.detach(),
                         clipped_win=(raw_win < 1 - clip_eps) | (raw_win > 1 + clip_eps),
                         clipped_lose=(raw_lose < 1 - clip_eps) | (raw_lose > 1 + clip_eps))
