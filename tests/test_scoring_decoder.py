"""Opt-in fast scoring (train_spo.scoring_decoder) and the rollout's decode batching: what the SPM sees,
and nothing else, changes; a decoder that reads other latents is refused by name; the distilled digits
decoder learns the VAE's decode."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from test_spo_training import CFG, PROMPTS, PromptAwareScorer, rollout
from tiny_models import build_tiny_sd

from spo.config import MissingPathError
from spo.models.diffusion_model import load_diffusion_model
from spo.models.scoring_decoder import load_scoring_decoder, tiny_decoder_like, upsampling_factor
from spo.training.decoder_distillation import DistillSettings, distill_tiny_decoder, psnr
from spo.training.spm_training import PairBatch
from spo.training.spo_trainer import rollout_settings

SETTINGS = dataclasses.replace(rollout_settings(CFG), threshold=0.0)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def model(tiny_sd_dir):
    return load_diffusion_model(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def tiny_decoder_dir(tiny_sd_dir, tmp_path_factory):
    torch.manual_seed(3)
    decoder = tiny_decoder_like(load_diffusion_model(str(tiny_sd_dir)).vae, channels=16)
    path = tmp_path_factory.mktemp("taesd")
    decoder.save_pretrained(path)
    return path


def test_tiny_decoder_reads_the_vaes_latents_and_gives_its_image_size(model, tiny_decoder_dir):
    decoder = load_scoring_decoder(str(tiny_decoder_dir), model.vae)
    assert isinstance(decoder, AutoencoderTiny) and not decoder.training
    assert upsampling_factor(decoder) == upsampling_factor(model.vae) == 2
    latents = torch.randn(3, 4, 8, 8)
    assert model.decode_latents(latents).shape == decoder.decode(latents).sample.shape == (3, 3, 16, 16)
    # TAESD's layout for SD's 4-level VAE: 3 upsamplings, blocks (3, 3, 3, 1), 64 channels
    sd_vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4)
    taesd = tiny_decoder_like(sd_vae)
    assert taesd.config.num_decoder_blocks == (3, 3, 3, 1) and taesd.config.decoder_block_out_channels == (64,) * 4
    assert upsampling_factor(taesd) == upsampling_factor(sd_vae) == 8


def test_decode_for_scoring_is_the_vae_unless_a_decoder_is_set(model, tiny_decoder_dir):
    latents = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.decode_for_scoring(latents), model.decode_latents(latents), rtol=0, atol=0)
    model.scoring_decoder = load_scoring_decoder(str(tiny_decoder_dir), model.vae)
    expected = model.scoring_decoder.decoder(latents).clamp(-1, 1)  # scaling factor 1: the scaled latents as they are
    torch.testing.assert_close(model.decode_for_scoring(latents), expected)
    assert not torch.allclose(model.decode_for_scoring(latents), model.decode_latents(latents), atol=1e-2)


def test_a_copy_of_the_vae_as_scoring_decoder_changes_nothing(model):
    pairs, stats = rollout(model, SETTINGS, PromptAwareScorer(), [1, 2, 3])
    model.scoring_decoder = copy.deepcopy(model.vae)
    pairs_2, stats_2 = rollout(model, SETTINGS, PromptAwareScorer(), [1, 2, 3])
    for name, value in pairs.tensors().items():
        if value is not None:
            torch.testing.assert_close(getattr(pairs_2, name), value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(torch.cat(stats_2.scores), torch.cat(stats.scores), rtol=0, atol=0)


def test_a_fast_decoder_changes_only_the_scores(model, tiny_decoder_dir):
    scorer = PromptAwareScorer(scale=3e4)  # gaps far apart: decisions follow the scores
    pairs, stats = rollout(model, SETTINGS, scorer, [1, 2, 3])
    model.scoring_decoder = load_scoring_decoder(str(tiny_decoder_dir), model.vae)
    pairs_2, stats_2 = rollout(model, SETTINGS, scorer, [1, 2, 3])
    assert not torch.allclose(torch.cat(stats_2.scores), torch.cat(stats.scores))
    # the first branching happens before any score is used: its x_t are the same, and the UNet is untouched
    first = (pairs.step_index == SETTINGS.branch_start_step)
    first_2 = (pairs_2.step_index == SETTINGS.branch_start_step)
    torch.testing.assert_close(pairs_2.latents_t[first_2], pairs.latents_t[first], rtol=0, atol=0)


def test_decode_batch_size_keeps_pairs_and_scores(model):
    pairs, stats = rollout(model, SETTINGS, PromptAwareScorer(), [5, 6, 7])
    for size in (1, 5):
        pairs_2, stats_2 = rollout(model, dataclasses.replace(SETTINGS, decode_batch_size=size),
                                   PromptAwareScorer(), [5, 6, 7])
        torch.testing.assert_close(torch.cat(stats_2.scores), torch.cat(stats.scores), rtol=1e-5, atol=1e-4)
        assert [c.tolist() for c in stats_2.choices] == [c.tolist() for c in stats.choices]
        torch.testing.assert_close(pairs_2.latents_win, pairs.latents_win)


def test_a_decoder_of_other_latents_is_refused_by_name(model, tmp_path):
    other = tiny_decoder_like(model.vae, channels=8)
    wrong_channels = AutoencoderTiny(latent_channels=8, encoder_block_out_channels=(8, 8),
                                     decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                                     num_decoder_blocks=(1, 1))
    wrong_channels.save_pretrained(tmp_path / "channels")
    with pytest.raises(ValueError, match=r"scoring_decoder: .*channels.* reads 8 latent channels, .* writes 4"):
        load_scoring_decoder(str(tmp_path / "channels"), model.vae)
    wrong_factor = AutoencoderTiny(latent_channels=4, encoder_block_out_channels=(8, 8, 8),
                                   decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1),
                                   num_decoder_blocks=(1, 1, 1))
    wrong_factor.save_pretrained(tmp_path / "factor")
    with pytest.raises(ValueError, match=r"upsamples by 4, the model's VAE by 2"):
        load_scoring_decoder(str(tmp_path / "factor"), model.vae)
    with pytest.raises(MissingPathError, match=r"train_spo.scoring_decoder: local model directory not found"):
        load_scoring_decoder(str(tmp_path / "nowhere"), model.vae)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not a diffusers autoencoder directory"):
        load_scoring_decoder(str(tmp_path / "empty"), model.vae)
    other.save_pretrained(tmp_path / "ok")
    assert isinstance(load_scoring_decoder(str(tmp_path / "ok"), model.vae), AutoencoderTiny)


def test_psnr_against_its_definition():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.04))
    assert psnr(a, a) == math.inf


def test_distillation_learns_the_vaes_decode(model):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1

    def load_batch(indices):
        idx = torch.tensor(list(indices)) % 8
        return PairBatch(prompts=[PROMPTS[i % 3] for i in idx.tolist()], images_0=images[idx], images_1=images[idx + 8],
                         label_0=torch.ones(len(idx)), label_1=torch.zeros(len(idx)))

    settings = DistillSettings(steps=60, batch_size=8, learning_rate=3e-3, channels=16)
    decoder, losses = distill_tiny_decoder(model, load_batch, list(range(8)), settings)
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert all(p.grad is None for p in decoder.encoder.parameters())  # only the decoder half trains
    latents = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        error = F.mse_loss(decoder.decode(latents).sample.clamp(-1, 1), model.decode_latents(latents))
    untrained = tiny_decoder_like(model.vae, channels=16)
    with torch.no_grad():
        error_untrained = F.mse_loss(untrained.decode(latents).sample.clamp(-1, 1), model.decode_latents(latents))
    assert error < error_untrained
