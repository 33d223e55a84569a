"""train_spo's memory and precision options keep the maths: gradient checkpointing, the eager attention
processor, channels-last memory format, and full fine-tuning against a frozen copy."""

import dataclasses
import math

import pytest
import torch
from test_spo_training import CFG, PROMPTS, context, kept_pairs, perturb_lora
from tiny_models import build_tiny_sd

from spo.models.diffusion_model import load_diffusion_model
from spo.stages.train_spo import prepare_unet
from spo.training.spo_trainer import train_step


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def step_grads(model_dir, pairs, **options):
    model = load_diffusion_model(str(model_dir))
    cfg = dataclasses.replace(CFG, grad_clip=0.0, **options)
    if cfg.channels_last:
        model.to_memory_format(torch.channels_last)
    torch.manual_seed(0)
    params, reference = prepare_unet(model, cfg)
    if not cfg.full_finetune:
        perturb_lora(model.unet, scale=0.02)
    model.unet.train()
    ctx = context(params, cfg)
    ctx.reference = reference
    logs = train_step(model, pairs, model.encode_prompts(PROMPTS), model.encode_negative(), cfg, ctx)
    return model, params, reference, logs, [p.grad.clone() for p in params]


@pytest.fixture(scope="module")
def pairs(tiny_sd_dir):
    return kept_pairs(load_diffusion_model(str(tiny_sd_dir)), seed=4, n=6)


@pytest.mark.parametrize("option", [{"gradient_checkpointing": True}, {"attention": "eager"},
                                    {"channels_last": True}])
def test_memory_options_give_the_same_gradients(tiny_sd_dir, pairs, option):
    *_, logs, plain = step_grads(tiny_sd_dir, pairs)
    model, *_, logs_opt, grads = step_grads(tiny_sd_dir, pairs, **option)
    if "gradient_checkpointing" in option:
        assert model.unet.is_gradient_checkpointing
    elif "channels_last" in option:
        conv = model.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"AttnProcessor"}
    scale = max(g.abs().max().item() for g in plain)
    assert scale > 0 and max((a - b).abs().max().item() for a, b in zip(plain, grads)) < 1e-4 * scale
    assert logs_opt["loss"] == pytest.approx(logs["loss"], rel=1e-5)  # kernels differ: ~2e-6 measured


def test_full_finetune_trains_every_weight_against_a_frozen_copy(tiny_sd_dir, pairs):
    model, params, reference, logs, _ = step_grads(tiny_sd_dir, pairs, full_finetune=True, learning_rate=1e-4)
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference before the step
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.unet.parameters())
    assert not any("lora" in name for name, _ in model.unet.named_parameters())
    base = load_diffusion_model(str(tiny_sd_dir)).unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 100])
    embeds = model.encode_prompts(PROMPTS[:2]).hidden_states
    with torch.no_grad(), reference() as frozen:
        assert frozen is not model.unet
        torch.testing.assert_close(frozen(x, t, encoder_hidden_states=embeds).sample,
                                   base(x, t, encoder_hidden_states=embeds).sample)  # unchanged by the step
        assert not torch.allclose(model.unet(x, t, encoder_hidden_states=embeds).sample,
                                  base(x, t, encoder_hidden_states=embeds).sample)  # the policy moved
