"""The Diffusion-DPO loss (Wallace et al. 2023, DESIGN 3.3) on per-pair denoising errors.

With mse = mean over latent elements of ‖ε − ε̂(x_t)‖² (the paper's code: a mean, not a sum, which is what
β = 5000 is sized for), the implicit reward margin of a pair is
    inside = −β/2 · ((mse_θ(w) − mse_ref(w)) − (mse_θ(l) − mse_ref(l))),
and the loss −log σ(inside), averaged over pairs. The 1/2 is kept, as in the paper, its code and diffusers'
SDXL example; diffusers' SD1.5 example drops it (its β 2500 is this β 5000). At the start the policy is
the reference, inside = 0 and the loss is ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOLossOutput:
    loss: torch.Tensor  # scalar, the mean over pairs
    inside: torch.Tensor  # (N,) the implicit reward margin β/2 · (improvement on w − improvement on l)
    implicit_accuracy: torch.Tensor  # (N,) 1 where inside > 0, 1/2 at a tie, else 0 (no grad)


def dpo_loss(model_mse_win: torch.Tensor, model_mse_lose: torch.Tensor, ref_mse_win: torch.Tensor,
             ref_mse_lose: torch.Tensor, *, beta: float) -> DPOLossOutput:
    """Per-pair denoising errors (N,) of the policy (with grad) and the frozen reference, in fp32."""
    inside = -0.5 * beta * ((model_mse_win - ref_mse_win) - (model_mse_lose - ref_mse_lose))
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        accuracy = (inside > 0).float() + 0.5 * (inside == 0).float()
    return DPOLossOutput(loss, inside, accuracy)
