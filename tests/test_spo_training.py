"""SPO on a tiny real SD-format model: the rollout and the loss against independent slow code (tests/
spo_reference.py), the LoRA reference, accumulation, clipping, and the loop's logs."""

import dataclasses
import math

import pytest
import torch
from spo_reference import naive_log_prob, naive_rollout, naive_spo_loss
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import adapter_disabled, add_lora, load_lora, save_lora
from spo.tracking.tracker import MemoryTracker
from spo.training.spo_trainer import (
    StepContext,
    make_optimizer,
    make_scheduler,
    pair_log_probs,
    rollout_settings,
    train_spo,
    train_step,
)
from spo.training.step_sampling import (
    StepPairs,
    initial_latents,
    prompt_generators,
    rollout_pairs,
    select_best_worst,
)

CFG = dataclasses.replace(load_profile("digits").train_spo, mixed_precision="fp32", prompts_per_round=3,
                          prompts_per_rollout=3, pairs_per_step=8, pairs_per_batch=4)
PROMPTS = ["a red fox", "blue", "zz top"]
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def model(tiny_sd_dir):
    return load_diffusion_model(str(tiny_sd_dir))


def perturb_lora(unet, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * scale


def unet_out(unet, latents, t, embeds):
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=embeds).sample


class PromptAwareScorer:
    """Depends on the image, the prompt and the timestep (so a candidate scored with another prompt's
    embedding, or at another timestep, scores differently); `scale` puts gaps around the keep threshold."""

    def __init__(self, scale=300.0, num_prompts=8):
        gen = torch.Generator().manual_seed(7)
        self.directions = torch.randn(num_prompts, 3, generator=gen)
        self.scale = scale

    def __call__(self, images, prompt_index, timesteps):
        colour = images.mean(dim=(2, 3))  # (N, 3)
        return self.scale * (colour * self.directions[prompt_index]).sum(dim=1) + timesteps.float() / 1000

    def one(self, image, prompt, t):
        return self(image[None], torch.tensor([prompt]), torch.tensor([t]))[0]


def rows(cond):
    return [cond[i].unet_kwargs() for i in range(len(cond))]


# ----------------------------------------------------------------------------------------------------
# the LoRA reference


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


# ----------------------------------------------------------------------------------------------------
# the rollout


def test_keep_rule_thresholds_the_softmax_gap_not_the_score_gap():
    # raw gaps 0.5 and 0.7 both exceed 0.3; only 0.7 clears the softmax gap: tanh(0.35) = 0.336 > 0.3,
    # tanh(0.25) = 0.245 < 0.3 (the rule is a score gap above 2·atanh(0.3) = 0.619)
    scores = torch.tensor([[0.0, 0.5, 0.2, 0.1], [0.1, 0.7, 0.0, 0.15], [3.0, -1.0, 0.0, 0.0]])
    best, worst, keep = select_best_worst(scores, threshold=0.3)
    assert best.tolist() == [1, 1, 0] and worst.tolist() == [0, 2, 1]
    assert keep.tolist() == [False, True, True]
    assert math.tanh(0.35) > 0.3 > math.tanh(0.25)


def rollout(model, settings, scorer, seeds, prompts=PROMPTS, shape=SHAPE):
    gens = prompt_generators(seeds)
    init = initial_latents(gens, shape)
    return rollout_pairs(model, model.encode_prompts(prompts), model.encode_negative(), settings, scorer, init, gens)


def compare_with_naive(model, settings, scorer, seeds, prompts=PROMPTS, shape=SHAPE):
    pairs, stats = rollout(model, settings, scorer, seeds, prompts, shape)
    cond = model.encode_prompts(prompts)
    ref = naive_rollout(model, rows(cond), model.encode_negative()[0].unet_kwargs(),
                        steps=settings.num_inference_steps, eta=settings.eta, scale=settings.guidance_scale,
                        k=settings.num_candidates, branch=settings.branch_start_step, inner=settings.inner_steps,
                        threshold=settings.threshold, scorer=scorer.one, seeds=seeds, shape=shape)
    b = len(prompts)
    chunks = len(stats.scores)
    # every candidate's score, chunk by chunk (b-major, k-minor), and every continuation index
    for chunk in range(chunks):
        expected = torch.tensor([ref.scores[(p, chunk)] for p in range(b)]).flatten()
        torch.testing.assert_close(stats.scores[chunk], expected, atol=2e-4, rtol=1e-4)
        assert stats.choices[chunk].tolist() == [ref.choices[(p, chunk)] for p in range(b)]
    # the same kept pairs, in the canonical order
    ours = pairs.canonical_order()
    theirs = sorted(ref.pairs, key=lambda p: (p.step_index, p.prompt))
    assert len(ours) == len(theirs) == stats.num_kept * (settings.inner_steps + 1)
    assert ours.prompt_index.tolist() == [p.prompt for p in theirs]
    assert ours.timesteps.tolist() == [p.timestep for p in theirs]
    for name, field in (("latents_t", "x_t_win"), ("latents_win", "x_win"), ("latents_lose", "x_lose")):
        torch.testing.assert_close(getattr(ours, name), torch.stack([getattr(p, field) for p in theirs]),
                                   atol=1e-4, rtol=1e-4, msg=name)
    lose_t = ours.latents_t if ours.latents_t_lose is None else ours.latents_t_lose
    torch.testing.assert_close(lose_t, torch.stack([p.x_t_lose for p in theirs]), atol=1e-4, rtol=1e-4)
    return pairs, stats, ref


def test_rollout_equals_the_naive_per_candidate_rollout(model):
    """Guards, each against the slow reference: a candidate's x̂0 is predicted and scored at its own timestep
    t_prev (not t); the K candidates share one mean; each is denoised and scored with its own prompt's
    embedding (repeat_interleave, not repeat); the next step continues from a uniformly random candidate
    (not the best) with that candidate's own noise prediction (not candidate 0's); the keep rule
    thresholds the softmax gap."""
    settings = rollout_settings(CFG)  # 20 steps, k = 4, branch at 4, threshold 0.3
    _, stats, ref = compare_with_naive(model, settings, PromptAwareScorer(), seeds=[11, 12, 13])
    # the comparison is informative: some comparisons kept, some rejected, some with a score gap that a
    # raw-gap rule would keep but the softmax rule rejects, and continuations other than the best
    gaps = torch.stack([s.view(3, 4).max(1).values - s.view(3, 4).min(1).values for s in stats.scores]).flatten()
    assert 0.1 < stats.kept_pair_rate < 0.9
    assert ((gaps > 0.3) & (gaps < 2 * math.atanh(0.3))).any()
    best = [int(torch.tensor(ref.scores[key]).argmax()) for key in sorted(ref.choices)]
    assert any(c != b for c, b in zip([ref.choices[key] for key in sorted(ref.choices)], best))


def test_rollout_structure(model):
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    seen = []

    def scorer(images, prompt_index, timesteps):
        seen.append(sorted(set(timesteps.tolist())))
        return images.mean(dim=(1, 2, 3))

    pairs, stats = rollout(model, dataclasses.replace(rollout_settings(CFG), threshold=0.0), scorer, [0, 1, 2])
    handle.remove()
    # 4 plain steps + 1 call at the branch + 15 candidate calls: as many UNet calls as plain sampling
    assert len(calls) == 20
    assert calls[:5] == [6] * 5 and calls[5:] == [3 * 4 * 2] * 15  # CFG doubles the batch; B*K candidates
    assert [t[0] for t in seen] == list(range(701, 0, -50)) + [0]  # scored at their own timestep, x0 at 0
    assert len(pairs) == 3 * 16 == stats.num_kept  # threshold 0: every comparison kept
    assert set(pairs.timesteps.tolist()) == set(range(751, 0, -50))  # no pairs for t > 750
    assert pairs.latents_t_lose is None  # SD1.5: win and lose share x_t


def test_random_continuation_picks_every_candidate(model):
    settings = dataclasses.replace(rollout_settings(CFG), num_inference_steps=8, branch_start_step=1, threshold=0.0)
    seeds = list(range(12))
    _, stats = rollout(model, settings, PromptAwareScorer(num_prompts=12), seeds, prompts=[f"p{i}" for i in seeds])
    choices = torch.cat(stats.choices)
    counts = torch.bincount(choices, minlength=4)
    assert len(choices) == 12 * 7 and (counts > 0).all()
    assert counts.max() < 0.5 * len(choices)  # uniform-ish (expected 21 each), not stuck on one index
    best = torch.cat([s.view(12, 4).argmax(1) for s in stats.scores])
    assert (choices != best).float().mean() > 0.5  # not the best (expected 3/4 differ)


def test_rollout_does_not_depend_on_batch_mates(model):
    """Per-prompt generators: prompt 1 alone gives the pairs it gives next to prompts 0 and 2 (what lets N
    processes reproduce one)."""
    settings = dataclasses.replace(rollout_settings(CFG), threshold=0.0)
    scorer = PromptAwareScorer()
    together, _ = rollout(model, settings, scorer, [5, 6, 7])
    gens = prompt_generators([6])
    alone, _ = rollout_pairs(model, model.encode_prompts([PROMPTS[1]]), model.encode_negative(), settings, scorer,
                             initial_latents(gens, SHAPE), gens, prompt_ids=torch.tensor([1]))
    mine = together.select(torch.nonzero(together.prompt_index == 1)[:, 0])
    torch.testing.assert_close(alone.latents_win, mine.latents_win, atol=1e-4, rtol=1e-5)  # |x| up to ~50
    assert alone.prompt_index.tolist() == mine.prompt_index.tolist()


# ----------------------------------------------------------------------------------------------------
# the loss


def kept_pairs(model, seed=1, n=6):
    settings = dataclasses.replace(rollout_settings(CFG), threshold=0.0)
    pairs, _ = rollout(model, settings, PromptAwareScorer(), [seed, seed + 1, seed + 2])
    return pairs.select(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n])


def context(params, cfg):
    opt = make_optimizer(params, cfg)
    return StepContext(params, opt, make_scheduler(opt, cfg), lambda: torch.autocast("cpu", enabled=False))


def naive_loss(model, pairs, cfg, prompts=PROMPTS):
    """The published structure: four separate UNet passes per pair (policy/reference x win/lose), one pair
    at a time; for MSPO the loser's own x_t."""
    sched = type(model.scheduler).from_config(model.scheduler.config)
    sched.set_timesteps(cfg.num_inference_steps)
    cond, uncond = model.encode_prompts(prompts), model.encode_negative()[0].unet_kwargs()
    lose_t = pairs.latents_t if pairs.latents_t_lose is None else pairs.latents_t_lose
    terms = {key: [] for key in ("pw", "pl", "rw", "rl")}
    for n in range(len(pairs)):
        row, t = cond[int(pairs.prompt_index[n])].unet_kwargs(), int(pairs.timesteps[n])
        args = (row, uncond, cfg.guidance_scale, cfg.eta)
        terms["pw"].append(naive_log_prob(sched, model.unet, pairs.latents_t[n], pairs.latents_win[n], t, *args))
        terms["pl"].append(naive_log_prob(sched, model.unet, lose_t[n], pairs.latents_lose[n], t, *args))
        with torch.no_grad(), adapter_disabled(model.unet):
            terms["rw"].append(naive_log_prob(sched, model.unet, pairs.latents_t[n], pairs.latents_win[n], t, *args))
            terms["rl"].append(naive_log_prob(sched, model.unet, lose_t[n], pairs.latents_lose[n], t, *args))
    return naive_spo_loss(terms["pw"], terms["pl"], terms["rw"], terms["rl"], cfg.beta, cfg.clip_eps)


def test_loss_and_gradients_equal_the_naive_four_calls(model):
    cfg = dataclasses.replace(CFG, grad_clip=0.0, pairs_per_batch=6, learning_rate=1e-12)
    params = add_lora(model.unet, cfg)
    perturb_lora(model.unet, scale=0.02)  # ratios inside the clamp: the gradient is not zero
    pairs = kept_pairs(model)
    cond = model.encode_prompts(PROMPTS)
    lp = pair_log_probs(model, pairs, cond[pairs.prompt_index], model.encode_negative(), cfg)
    assert lp.policy_win.requires_grad and not lp.ref_win.requires_grad
    logs = train_step(model, pairs, cond, model.encode_negative(), cfg, context(params, cfg))
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected = naive_loss(model, pairs, cfg)
    expected.backward()
    assert logs["loss"] == pytest.approx(expected.item(), rel=1e-5)
    worst = max((a - p.grad).abs().max().item() for a, p in zip(ours, params))
    scale = max(p.grad.abs().max().item() for p in params)
    assert scale > 0 and worst < 1e-4 * scale


def test_accumulation_over_micro_batches_equals_one_batch(tiny_sd_dir):
    """One step over 4 micro-batches of 2 pairs = one step over the 8 pairs: the gradient (no clipping to
    hide its scale) and the logged loss and norm."""
    grads, logs = [], []
    for micro in (8, 2):
        model = load_diffusion_model(str(tiny_sd_dir))
        cfg = dataclasses.replace(CFG, grad_clip=0.0, pairs_per_batch=micro)
        torch.manual_seed(0)  # the LoRA's gaussian A
        params = add_lora(model.unet, cfg)
        perturb_lora(model.unet, scale=0.02)
        pairs = kept_pairs(model, seed=3, n=8)
        logs.append(train_step(model, pairs, model.encode_prompts(PROMPTS), model.encode_negative(), cfg,
                               context(params, cfg)))
        grads.append([p.grad.clone() for p in params])
    scale = max(g.abs().max().item() for g in grads[0])
    worst = max((a - b).abs().max().item() for a, b in zip(*grads))
    assert scale > 0 and worst < 1e-3 * scale  # rounding only: a missing 1/4 would be off by 3x the scale
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-5)
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-4) and logs[0]["grad_norm"] > 0


def test_train_step_clips_and_updates_only_lora(model):
    cfg = dataclasses.replace(CFG, grad_clip=1e-4)
    params = add_lora(model.unet, cfg)
    base_before = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora" not in n}
    lora_before = [p.detach().clone() for p in params]
    pairs = kept_pairs(model, n=8)
    logs = train_step(model, pairs, model.encode_prompts(PROMPTS), model.encode_negative(), cfg,
                      context(params, cfg))
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at init
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
    tracker = MemoryTracker()
    history = train_spo(model, lambda prompts: PromptAwareScorer(), ["one", "two", "three", "four"], params, cfg,
                        resolution=16, seed=0, tracker=tracker)
    # 4 prompts, 3 per round -> 2 rounds with 48 and 16 pairs -> 6 + 2 optimizer steps of <= 8 pairs
    assert len(history) == 8 and [h["round"] for h in history] == [0] * 6 + [1] * 2
    expected = {"loss", "ratio_win", "ratio_lose", "clamped_ratio_win", "clamped_ratio_lose", "clip_fraction",
                "grad_norm", "lr", "pairs_per_second", "peak_memory_gb", "kept_pair_rate", "spm_score_mean",
                "spm_score_std", "spm_score_mean_t0", "spm_score_mean_t500", "spm_score_std_t250"}
    assert expected <= set(tracker.metrics)
    assert all(0 <= h["clip_fraction"] <= 1 and h["lr"] == cfg.learning_rate for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_step_pairs_cat_and_canonical_order():
    def part(step, prompts, lose=None):
        n = len(prompts)
        return StepPairs(torch.full((n, 1), float(step)), torch.zeros(n, 1), torch.zeros(n, 1),
                         torch.full((n,), 1000 - step), torch.tensor(prompts), torch.full((n,), step), lose)

    pairs = StepPairs.cat([part(5, [2, 0]), part(4, [1])]).canonical_order()
    assert pairs.step_index.tolist() == [4, 5, 5] and pairs.prompt_index.tolist() == [1, 0, 2]
    assert pairs.latents_t_lose is None
