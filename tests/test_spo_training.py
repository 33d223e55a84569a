"""SPO on a tiny real SD-format model: LoRA reference, step-wise rollout, one-call log-probs, updates."""

import dataclasses
from contextlib import nullcontext

import pytest
import torch
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.diffusion.ddim import ddim_step, gaussian_log_prob
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import adapter_disabled, add_lora, load_lora, save_lora
from spo.tracking.tracker import MemoryTracker
from spo.training.spo_trainer import (
    make_optimizer,
    pair_log_probs,
    rollout_settings,
    train_spo,
    train_step,
)
from spo.training.step_sampling import rollout_pairs, select_best_worst

CFG = dataclasses.replace(load_profile("digits").train_spo, mixed_precision="fp32", prompts_per_round=3, pairs_per_batch=4,
                          gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def model(tiny_sd_dir):
    return load_diffusion_model(str(tiny_sd_dir))


def perturb_lora(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.1


def unet_out(unet, latents, t, embeds):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=embeds).sample


def test_lora_disabled_is_exactly_the_base(model):
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    embeds = model.encode_prompts(["one", "two"]).hidden_states
    base = unet_out(model.unet, latents, t, embeds)
    add_lora(model.unet, CFG)
    assert torch.equal(unet_out(model.unet, latents, t, embeds), base)  # B = 0 at init
    perturb_lora(model.unet)
    assert not torch.allclose(unet_out(model.unet, latents, t, embeds), base)
    with adapter_disabled(model.unet):
        assert torch.equal(unet_out(model.unet, latents, t, embeds), base)
    assert not torch.allclose(unet_out(model.unet, latents, t, embeds), base)  # re-enabled afterwards


def test_lora_round_trips_through_diffusers_format(model, tiny_sd_dir, tmp_path):
    add_lora(model.unet, CFG)
    perturb_lora(model.unet)
    save_lora(model.unet, tmp_path / "lora")
    fresh = load_diffusion_model(str(tiny_sd_dir))
    load_lora(fresh.unet, tmp_path / "lora")
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 300])
    embeds = model.encode_prompts(["one", "two"]).hidden_states
    torch.testing.assert_close(unet_out(fresh.unet, latents, t, embeds), unet_out(model.unet, latents, t, embeds))
    with pytest.raises(FileNotFoundError, match="LoRA weights not found"):
        load_lora(fresh.unet, tmp_path / "missing")


def test_select_best_worst_applies_the_softmax_gap():
    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0], [0.1, 0.2, 0.0, 0.15]])
    best, worst, keep = select_best_worst(scores, threshold=0.3)
    assert best.tolist() == [1, 1] and worst.tolist() == [3, 2]
    # gap of softmax(2, -1) = tanh(1.5) = 0.905 > 0.3; softmax(0.2, 0) gap = tanh(0.1) = 0.0997 < 0.3
    assert keep.tolist() == [True, False]


class RecordingScorer:
    """A deterministic preference: brighter images win. Records what it was asked to score."""

    def __init__(self):
        self.timesteps = []

    def __call__(self, images, prompt_index, timesteps):
        self.timesteps.append(sorted(set(timesteps.tolist())))
        return images.mean(dim=(1, 2, 3)) * 100 + prompt_index * 0.0


def test_rollout_structure(model):
    scorer = RecordingScorer()
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    settings = dataclasses.replace(rollout_settings(CFG), threshold=0.0)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(3, 4, 8, 8, generator=gen)
    pairs, stats = rollout_pairs(model, model.encode_prompts(["a", "b", "c"]), model.encode_negative(),
                                 settings, scorer, init, gen)
    handle.remove()
    # 4 plain steps + 1 call at the branch + 15 candidate calls: as many UNet calls as plain sampling
    assert len(calls) == 20
    assert calls[:5] == [6] * 5 and calls[5:] == [3 * 4 * 2] * 15  # CFG doubles the batch; B*K candidates
    # candidates are scored at their own timestep: 701, 651, ..., 1, and the final x0 at 0
    assert [t[0] for t in scorer.timesteps] == list(range(701, 0, -50)) + [0]
    assert len(pairs) == 3 * 16 == stats.num_kept  # threshold 0: every comparison kept
    assert set(pairs.timesteps.tolist()) == set(range(751, 0, -50))  # no pairs for t > 750
    assert not torch.equal(pairs.latents_win, pairs.latents_lose)


def test_one_call_log_probs_equal_the_naive_four_calls(model):
    add_lora(model.unet, CFG)
    perturb_lora(model.unet)
    settings = dataclasses.replace(rollout_settings(CFG), threshold=0.0)
    gen = torch.Generator().manual_seed(1)
    cond, uncond = model.encode_prompts(["a", "b"]), model.encode_negative()
    pairs, _ = rollout_pairs(model, cond, uncond, settings, RecordingScorer(), torch.randn(2, 4, 8, 8, generator=gen), gen)
    pairs = pairs.select(torch.arange(6))
    fast = pair_log_probs(model, pairs, cond[pairs.prompt_index], uncond, CFG)

    def naive(unet, target):
        eps = guided_noise_pred(unet, pairs.latents_t, pairs.timesteps, cond[pairs.prompt_index], uncond, 5.0)
        step = ddim_step(model.scheduler, eps, pairs.timesteps, pairs.latents_t, 1.0)
        return gaussian_log_prob(target, step.mean, step.sigma)

    torch.testing.assert_close(fast.policy_win, naive(model.unet, pairs.latents_win))
    torch.testing.assert_close(fast.policy_lose, naive(model.unet, pairs.latents_lose))
    with adapter_disabled(model.unet):
        torch.testing.assert_close(fast.ref_win, naive(model.unet, pairs.latents_win))
        torch.testing.assert_close(fast.ref_lose, naive(model.unet, pairs.latents_lose))
    assert fast.policy_win.requires_grad and not fast.ref_win.requires_grad


def test_train_step_clips_and_updates_only_lora(model):
    cfg = dataclasses.replace(CFG, grad_clip=1e-4)
    params = add_lora(model.unet, cfg)
    base_before = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora" not in n}
    lora_before = [p.detach().clone() for p in params]
    settings = dataclasses.replace(rollout_settings(cfg), threshold=0.0)
    gen = torch.Generator().manual_seed(2)
    cond, uncond = model.encode_prompts(["a", "b"]), model.encode_negative()
    pairs, _ = rollout_pairs(model, cond, uncond, settings, RecordingScorer(), torch.randn(2, 4, 8, 8, generator=gen), gen)
    logs = train_step(model, pairs, cond, uncond, cfg, params, make_optimizer(params, cfg), nullcontext)
    assert logs["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at init
    clipped = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)).item()
    assert logs["grad_norm"] > 1e-4 and clipped == pytest.approx(1e-4, rel=1e-3)  # the clip really applied
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, params))
    for n, p in model.unet.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_before[n]), n


def test_train_spo_logs_and_changes_parameters(model):
    cfg = dataclasses.replace(CFG, num_epochs=1, threshold=0.0, learning_rate=1e-3)
    params = add_lora(model.unet, cfg)
    before = [p.detach().clone() for p in params]
    tracker, history = MemoryTracker(), []
    train_spo(model, lambda prompts: RecordingScorer(), ["one", "two", "three", "four"], params, cfg,
              resolution=16, seed=0, tracker=tracker, history=history)
    # 4 prompts, 3 per round -> 2 rounds with 48 and 16 pairs -> 6 + 2 optimizer steps of <= 8 pairs
    assert len(history) == 8 and [h["round"] for h in history] == [0] * 6 + [1] * 2
    assert {"loss", "ratio_win", "ratio_lose", "kept_pair_rate", "spm_score_mean", "spm_score_std"} <= set(tracker.metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
