"""SDXL's MSPO on the SDXL stand-in: k = 2, branch every 4 steps, 3 inner steps per candidate, all 4
transitions of the win and lose chunks trained; against the slow per-candidate reference."""

import dataclasses

import pytest
import torch
from test_spo_training import PromptAwareScorer, compare_with_naive, context, naive_loss, perturb_lora, rollout

from spo.config import load_profile
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import add_lora
from spo.standins.models import LATENT_SIZE, build_sdxl
from spo.tracking.tracker import MemoryTracker
from spo.training.spo_trainer import rollout_settings, train_spo, train_step

SDXL_CFG = dataclasses.replace(load_profile("sdxl").train_spo, mixed_precision="fp32", lora_rank=4, lora_alpha=4.0)
PROMPTS = ["a red fox", "blue"]
SHAPE = (4, LATENT_SIZE, LATENT_SIZE)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture
def sdxl(sdxl_dir):
    return load_diffusion_model(str(sdxl_dir))


def test_the_sdxl_profile_is_the_published_mspo():
    cfg = load_profile("sdxl").train_spo
    assert (cfg.num_candidates, cfg.inner_steps, cfg.branch_start_step, cfg.threshold) == (2, 3, 4, 0.4)
    assert (cfg.lora_rank, cfg.learning_rate, cfg.pairs_per_batch, cfg.pairs_per_step) == (64, 1e-5, 2, 16)
    assert load_profile("sdxl").model.vae == "madebyollin/sdxl-vae-fp16-fix"


def test_mspo_rollout_equals_the_naive_rollout(sdxl):
    settings = rollout_settings(SDXL_CFG)
    pairs, stats, ref = compare_with_naive(sdxl, settings, PromptAwareScorer(scale=3000.0), seeds=[3, 4],
                                           prompts=PROMPTS, shape=SHAPE)
    # branch at steps 4, 8, 12, 16; scored at the next chunk's start (t = 551, 351, 151) and at t = 0
    assert stats.score_timesteps == [551, 351, 151, 0] and len(stats.choices) == 4
    assert stats.num_kept > 0 and len(pairs) == 4 * stats.num_kept
    first = (pairs.step_index - 4) % 4 == 0  # a chunk's first transition starts from the shared x_t
    assert torch.equal(pairs.latents_t[first], pairs.latents_t_lose[first])
    assert not torch.isclose(pairs.latents_t[~first], pairs.latents_t_lose[~first]).all()


def test_mspo_unet_calls_match_plain_sampling(sdxl):
    calls = []
    handle = sdxl.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pairs, stats = rollout(sdxl, dataclasses.replace(rollout_settings(SDXL_CFG), threshold=0.0),
                           PromptAwareScorer(), [0, 1], PROMPTS, SHAPE)
    handle.remove()
    # 4 plain + the branch's call on B, then per chunk 3 inner calls and the scoring call on B*K (none at the end)
    assert calls == [4] * 5 + [8] * (4 * 3 + 3)
    assert len(pairs) == 2 * 16  # threshold 0: 4 chunks x 4 transitions per prompt
    assert sorted(set(pairs.timesteps.tolist())) == list(range(1, 752, 50))


def test_mspo_loss_and_gradients_equal_the_naive_per_transition_computation(sdxl):
    cfg = dataclasses.replace(SDXL_CFG, grad_clip=0.0, pairs_per_batch=3, learning_rate=1e-12)
    params = add_lora(sdxl.unet, cfg)
    perturb_lora(sdxl.unet, scale=0.02)
    pairs, _ = rollout(sdxl, dataclasses.replace(rollout_settings(cfg), threshold=0.0), PromptAwareScorer(),
                       [5, 6], PROMPTS, SHAPE)
    pairs = pairs.select(torch.tensor([0, 1, 2, 9, 17, 30]))  # first and inner transitions of both prompts
    assert (pairs.latents_t != pairs.latents_t_lose).any()
    logs = train_step(sdxl, pairs, sdxl.encode_prompts(PROMPTS), sdxl.encode_negative(), cfg, context(params, cfg))
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected = naive_loss(sdxl, pairs, cfg, prompts=PROMPTS)
    expected.backward()
    assert logs["loss"] == pytest.approx(expected.item(), rel=1e-5)
    scale = max(p.grad.abs().max().item() for p in params)
    worst = max((a - p.grad).abs().max().item() for a, p in zip(ours, params))
    assert scale > 0 and worst < 1e-4 * scale


@pytest.mark.slow  # a whole MSPO round
def test_mspo_trains_a_round_on_the_sdxl_standin(sdxl):
    cfg = dataclasses.replace(SDXL_CFG, num_epochs=1, threshold=0.0, prompts_per_round=2, learning_rate=1e-3)
    params = add_lora(sdxl.unet, cfg)
    before = [p.detach().clone() for p in params]
    tracker = MemoryTracker()
    history = train_spo(sdxl, lambda prompts: PromptAwareScorer(), PROMPTS, params, cfg, resolution=64, seed=0,
                        tracker=tracker)
    # one round: 2 prompts x 16 transitions = 32 pairs -> 2 optimizer steps of 16 (micro-batches of 2)
    assert len(history) == 2 and history[0]["num_pairs"] == 32
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
