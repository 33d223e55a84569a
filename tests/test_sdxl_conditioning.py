"""One loader and one guidance function for SD1.5 and SDXL: the conditioning equals diffusers' pipelines.

The references are diffusers' own `encode_prompt` / `_get_add_time_ids` and a hand-written UNet call with
classifier-free guidance, on tiny stand-ins of the real architectures (spo.standins.models).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from spo.diffusion.conditioning import PromptConditioning
from spo.diffusion.guidance import guided_noise_pred
from spo.diffusion.sampling import sample_images
from spo.models.diffusion_model import load_diffusion_model
from spo.standins.models import (
    IMAGE_SIZE,
    build_sd15,
    build_sdxl,
    build_sdxl_fp16_fix_vae,
)
from spo.training.spm_training import noisy_x0_images
from spo.training.step_sampling import RolloutSettings, initial_latents, prompt_generators, rollout_pairs

PROMPTS = ["a red fox", "a blue whale in the sea"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd15": build_sd15(root / "sd15"), "sdxl": build_sdxl(root / "sdxl"),
            "vae_fix": build_sdxl_fp16_fix_vae(root / "vae_fix")}


@pytest.fixture(scope="module")
def sdxl(dirs):
    return load_diffusion_model(str(dirs["sdxl"]))


@pytest.fixture(scope="module")
def sdxl_pipe(dirs) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(dirs["sdxl"])


def pipeline_time_ids(pipe: StableDiffusionXLPipeline, size: int, dtype: torch.dtype) -> torch.Tensor:
    return pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=dtype,
                                  text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)


# ----------------------------------------------------------------------------------------------------
# loading


def test_architecture_is_read_from_model_index(dirs, sdxl):
    sd15 = load_diffusion_model(str(dirs["sd15"]))
    assert sd15.architecture == "sd15" and sd15.text_encoder_2 is None and sd15.tokenizer_2 is None
    assert sdxl.architecture == "sdxl" and isinstance(sdxl.text_encoder_2, CLIPTextModelWithProjection)
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.force_zeros_for_empty_prompt is True
    assert not sdxl.text_encoder_2.training and not any(p.requires_grad for p in sdxl.text_encoder_2.parameters())
    # SDXL ships an EulerDiscrete config; as a DDIM config it gives the published leading schedule
    config = sdxl.scheduler.config
    assert (config.timestep_spacing, config.steps_offset, config.set_alpha_to_one) == ("leading", 1, False)
    sdxl.scheduler.set_timesteps(20)
    assert sdxl.scheduler.timesteps.tolist() == list(range(951, 0, -50))
    assert sdxl.default_resolution == IMAGE_SIZE and sd15.default_resolution == IMAGE_SIZE


def test_a_dir_that_is_neither_pipeline_is_a_clear_error(dirs, tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        load_diffusion_model(str(dirs["vae_fix"]))  # a bare AutoencoderKL dir
    other = tmp_path / "other"
    shutil.copytree(dirs["sd15"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="'FluxPipeline'.*StableDiffusionPipeline, StableDiffusionXLPipeline"):
        load_diffusion_model(str(other))


def test_fp16_fix_vae_replaces_the_vae_and_the_original_stays_float32_in_fp16(dirs):
    fixed = load_diffusion_model(str(dirs["sdxl"]), vae=str(dirs["vae_fix"]), dtype=torch.float16)
    reference = AutoencoderKL.from_pretrained(dirs["vae_fix"])
    assert fixed.vae.config.force_upcast is False and fixed.vae.dtype == torch.float16
    assert fixed.vae.config.scaling_factor == 0.13025
    torch.testing.assert_close(fixed.vae.decoder.conv_out.weight.float(), reference.decoder.conv_out.weight,
                               rtol=0, atol=1e-3)  # fp16 rounding of the replacement's own weights
    original = load_diffusion_model(str(dirs["sdxl"]), dtype=torch.float16)  # force_upcast: NaNs in fp16
    assert original.unet.dtype == torch.float16 and original.vae.dtype == torch.float32
    images = original.decode_latents(torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert images.dtype == torch.float32 and images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert load_diffusion_model(str(dirs["sdxl"]), dtype=torch.bfloat16).vae.dtype == torch.bfloat16
    # the SD1.5 pipeline ignores force_upcast, and so does the loader
    assert load_diffusion_model(str(dirs["sd15"]), dtype=torch.float16).vae.dtype == torch.float16


# ----------------------------------------------------------------------------------------------------
# conditioning == diffusers' pipelines


def test_sdxl_conditioning_equals_the_pipelines_encode_prompt(sdxl, sdxl_pipe):
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu",
                                                                        do_classifier_free_guidance=True)
    cond, uncond = sdxl.encode_prompts(PROMPTS, 1024), sdxl.encode_negative(1024)
    assert torch.equal(cond.hidden_states, embeds) and torch.equal(cond.pooled, pooled)
    assert cond.hidden_states.shape == (2, 77, 32 + 64) and cond.pooled.shape == (2, 64)
    assert len(uncond) == 1 and torch.equal(uncond.hidden_states, negative[:1]) and not uncond.hidden_states.any()
    assert torch.equal(uncond.pooled, negative_pooled[:1])
    expected_ids = pipeline_time_ids(sdxl_pipe, 1024, embeds.dtype)
    assert expected_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]]
    assert torch.equal(cond.time_ids, expected_ids.repeat(2, 1)) and torch.equal(uncond.time_ids, expected_ids)
    # default: the model's own resolution
    assert torch.equal(sdxl.encode_prompts(PROMPTS).time_ids, pipeline_time_ids(sdxl_pipe, IMAGE_SIZE,
                                                                                embeds.dtype).repeat(2, 1))


def test_sdxl_negative_without_force_zeros_is_the_encoded_empty_prompt(dirs, tmp_path, sdxl_pipe):
    plain = tmp_path / "sdxl"
    shutil.copytree(dirs["sdxl"], plain)
    index = json.loads((plain / "model_index.json").read_text())
    (plain / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    model = load_diffusion_model(str(plain))
    assert model.force_zeros_for_empty_prompt is False
    sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, negative, _, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS[:1], device="cpu",
                                                                  do_classifier_free_guidance=True)
    finally:
        sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    uncond = model.encode_negative()
    assert uncond.hidden_states.any() and torch.equal(uncond.hidden_states, negative)
    assert torch.equal(uncond.pooled, negative_pooled)


def test_sd15_conditioning_equals_the_pipelines_encode_prompt(dirs):
    model = load_diffusion_model(str(dirs["sd15"]))
    pipe = StableDiffusionPipeline.from_pretrained(dirs["sd15"])
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    cond, uncond = model.encode_prompts(PROMPTS), model.encode_negative()
    assert torch.equal(cond.hidden_states, embeds) and cond.pooled is None and cond.time_ids is None
    assert torch.equal(uncond.expand(2).hidden_states, negative)
    assert "added_cond_kwargs" not in cond.unet_kwargs()


# ----------------------------------------------------------------------------------------------------
# guidance and the callers on SDXL


def test_guided_noise_pred_on_sdxl_equals_a_hand_written_cfg_call(sdxl, sdxl_pipe):
    gen = torch.Generator().manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500, 20])
    ours = guided_noise_pred(sdxl.unet, latents, timesteps, sdxl.encode_prompts(PROMPTS), sdxl.encode_negative(), 5.0)

    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu",
                                                                        do_classifier_free_guidance=True)
    time_ids = pipeline_time_ids(sdxl_pipe, IMAGE_SIZE, embeds.dtype)
    with torch.no_grad():  # as StableDiffusionXLPipeline.__call__ lays out one CFG batch
        out = sdxl_pipe.unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                             encoder_hidden_states=torch.cat([negative, embeds]),
                             added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]),
                                                "time_ids": torch.cat([time_ids, time_ids]).repeat(2, 1)}).sample
    uncond_out, cond_out = out.chunk(2)
    torch.testing.assert_close(ours, uncond_out + 5.0 * (cond_out - uncond_out))
    # the micro-conditioning really reaches the UNet
    other = guided_noise_pred(sdxl.unet, latents, timesteps, sdxl.encode_prompts(PROMPTS, 1024),
                              sdxl.encode_negative(1024), 5.0)
    assert not torch.allclose(ours, other)


def test_noisy_x0_images_on_sdxl(sdxl):
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out_0, out_1 = noisy_x0_images(sdxl, x, x.clone(), PROMPTS, torch.tensor([0, 700]), 5.0,
                                   torch.Generator().manual_seed(0))
    assert out_0.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(out_0).all()
    assert torch.equal(out_0, out_1)


def test_sampling_and_rollout_run_on_sdxl(sdxl):
    images = sample_images(sdxl, PROMPTS, [0, 1], resolution=IMAGE_SIZE, num_inference_steps=3, guidance_scale=5.0)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()
    settings = RolloutSettings(num_inference_steps=6, eta=1.0, guidance_scale=5.0, num_candidates=2,
                               branch_start_step=2, threshold=0.0)
    gens = prompt_generators([0, 1])
    pairs, stats = rollout_pairs(sdxl, sdxl.encode_prompts(PROMPTS), sdxl.encode_negative(), settings,
                                 lambda images, index, t: images.mean(dim=(1, 2, 3)),
                                 initial_latents(gens, (4, 8, 8)), gens)
    assert len(pairs) == stats.num_kept == 2 * 4 and torch.isfinite(pairs.latents_win).all()


# ----------------------------------------------------------------------------------------------------
# the conditioning's tensor ops


def test_prompt_conditioning_ops_keep_rows_together():
    rows = torch.arange(3.0)
    cond = PromptConditioning(rows[:, None, None].expand(3, 2, 4), rows[:, None].expand(3, 5),
                              rows[:, None].expand(3, 6))
    negative = cond[0]
    assert len(negative) == 1 and len(cond[-1]) == 1 and cond[-1].pooled[0, 0] == 2
    picked = cond[torch.tensor([2, 0])]
    assert picked.time_ids[:, 0].tolist() == [2, 0] and picked.hidden_states[:, 0, 0].tolist() == [2, 0]
    assert cond.repeat_interleave(2).pooled[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert cond.repeat(2).time_ids[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    both = PromptConditioning.cat([negative.expand(3), cond])
    assert len(both) == 6 and both.hidden_states[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 2]
    assert cond.to(dtype=torch.float16).pooled.dtype == torch.float16
    with pytest.raises(ValueError, match="broadcast"):
        cond.expand(4)
    with pytest.raises(ValueError, match="SD1.5 and SDXL"):
        PromptConditioning.cat([cond, PromptConditioning(cond.hidden_states)])
    with pytest.raises(ValueError, match="together"):
        PromptConditioning(cond.hidden_states, cond.pooled)
