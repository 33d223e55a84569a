"""DDIM maths: parity with diffusers.DDIMScheduler.step and a float64 log-density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo.diffusion.ddim import (
    ddim_step,
    gaussian_log_prob,
    predict_x0,
    previous_timestep,
)


def sd15_scheduler(set_alpha_to_one: bool) -> DDIMScheduler:
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    s.set_timesteps(20)
    return s


def test_leading_spacing_is_the_published_schedule():
    s = sd15_scheduler(False)
    assert s.timesteps.tolist() == list(range(951, 0, -50))
    assert previous_timestep(s, torch.tensor(1)).item() == -49


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_mean_and_sigma_match_diffusers_step(set_alpha_to_one, eta):
    s = sd15_scheduler(set_alpha_to_one)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    noise_pred = torch.randn(3, 4, 8, 8, generator=gen)
    variance_noise = torch.randn(3, 4, 8, 8, generator=gen)
    for t in s.timesteps:  # includes t = 1, whose predecessor uses final_alpha_cumprod
        ref = s.step(noise_pred, t, latents, eta=eta, variance_noise=variance_noise)
        ours = ddim_step(s, noise_pred, t, latents, eta)
        torch.testing.assert_close(ours.mean + ours.sigma * variance_noise, ref.prev_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.x0_pred, ref.pred_original_sample, atol=1e-6, rtol=1e-6)
        expected_sigma = eta * float(s._get_variance(t, t - 50)) ** 0.5
        assert ours.sigma.flatten()[0].item() == pytest.approx(expected_sigma, rel=1e-5, abs=1e-9)


def test_final_step_uses_alpha_one_when_asked():
    """With set_alpha_to_one the last step's mean is exactly x̂0 (ᾱ_prev = 1, σ = 0)."""
    s = sd15_scheduler(True)
    latents, noise_pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    step = ddim_step(s, noise_pred, torch.tensor(1), latents, eta=1.0)
    torch.testing.assert_close(step.mean, step.x0_pred)
    assert step.sigma.abs().max().item() == 0.0


def test_per_sample_timesteps_equal_separate_calls():
    s = sd15_scheduler(False)
    latents, noise_pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    both = ddim_step(s, noise_pred, torch.tensor([951, 401]), latents, 1.0)
    for i, t in enumerate([951, 401]):
        one = ddim_step(s, noise_pred[i:i + 1], torch.tensor(t), latents[i:i + 1], 1.0)
        torch.testing.assert_close(both.mean[i:i + 1], one.mean)
        torch.testing.assert_close(predict_x0(s, noise_pred[i:i + 1], torch.tensor(t), latents[i:i + 1]), one.x0_pred)


def test_gaussian_log_prob_matches_float64_reference():
    gen = torch.Generator().manual_seed(1)
    x, mu = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    sigma = torch.tensor([0.05, 0.1, 0.5, 1.0]).view(4, 1, 1, 1)
    ours = gaussian_log_prob(x, mu, sigma)
    x64, mu64 = x.double().numpy(), mu.double().numpy()
    for i in range(4):
        s = float(sigma[i])
        per_element = -((x64[i] - mu64[i]) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
        assert ours[i].item() == pytest.approx(per_element.mean(), rel=1e-5)


def test_epsilon_only():
    s = DDIMScheduler(prediction_type="v_prediction")
    s.set_timesteps(20)
    with pytest.raises(ValueError, match="v_prediction"):
        ddim_step(s, torch.zeros(1, 4, 8, 8), torch.tensor(951), torch.zeros(1, 4, 8, 8), 1.0)
