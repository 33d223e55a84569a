"""benchmarks/spo_round.py on CPU: both structures run, and they are the same maths (same kept pairs,
same losses); only where the work is batched differs."""

import json
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import spo_round  # noqa: E402


@pytest.mark.parametrize("arch,options", [("sd15", []), ("sdxl", []),
                                          ("sd15", ["--channels-last", "--decode-batch", "2"])])
def test_ours_and_published_keep_the_same_pairs_and_losses(arch, options, tmp_path, capsys):
    out = spo_round.main(["--device", "cpu", "--arch", arch, "--prompts", "2", "--steps", "6", "--candidates", "3",
                          "--pairs-per-batch", "4", "--out", str(tmp_path / "round.json"), *options])
    assert out["same_maths"] and out["ours_options"]["channels_last"] == bool(options)
    ours, published = out["structures"]["ours"], out["structures"]["published"]
    assert ours["kept_pairs_per_round"] == published["kept_pairs_per_round"] > 0  # threshold 0 keeps every scored step
    for a, b in zip(ours["pairs"], published["pairs"], strict=True):
        assert a["timesteps"] == b["timesteps"] and a["prompt_index"] == b["prompt_index"]
        assert a["latents_win_sum"] == pytest.approx(b["latents_win_sum"], rel=1e-5, abs=1e-4)
        assert a["latents_lose_sum"] == pytest.approx(b["latents_lose_sum"], rel=1e-5, abs=1e-4)
    assert len(ours["losses"]) == len(published["losses"]) > 0
    assert ours["losses"] == pytest.approx(published["losses"], rel=1e-5)
    for a, b in zip(ours["log_prob_sums"], published["log_prob_sums"], strict=True):  # policy/ref x win/lose
        assert a == pytest.approx(b, rel=1e-6)
    # SD1.5's pairs share x_t: the published four calls do twice the UNet work of ours (win and lose in one
    # call); MSPO's win and lose start apart, so ours batches them: fewer calls, the same samples
    work = 2 if arch == "sd15" else 1
    assert published["unet_samples_per_round"]["training"] == work * ours["unet_samples_per_round"]["training"]
    assert ours["unet_samples_per_round"]["sampling"] == published["unet_samples_per_round"]["sampling"]
    # the published rollout decodes each candidate on its own; ours the step's 2 prompts x 3 candidates at once
    # (or --decode-batch 2 at a time)
    scored = published["candidates_scored_per_round"]
    assert scored == ours["candidates_scored_per_round"] > 0 and published["vae_decode_calls_per_round"] == scored
    assert ours["vae_decode_calls_per_round"] == scored // (2 * 3) * (3 if options else 1)
    table = capsys.readouterr().out
    assert "ours vs published:" in table and "published" in table
    assert json.loads((tmp_path / "round.json").read_text())["speedup_ours_vs_published"] == out["speedup_ours_vs_published"]


def test_spm_step_benchmark_runs_the_stages_code_and_accounts_for_the_step(tmp_path):
    import spm_step

    out = spm_step.main(["--device", "cpu", "--batch", "2", "--steps", "1", "--out", str(tmp_path / "spm.json")])
    parts = out["breakdown_s"]
    assert set(parts) == {"x0_inputs", "spm_forward", "backward", "optimizer"} and min(parts.values()) > 0
    assert sum(parts.values()) <= out["seconds_per_step"] * 1.01  # the parts are inside the step
    assert out["pairs_per_second"] == pytest.approx(2 / out["seconds_per_step"])
    assert json.loads((tmp_path / "spm.json").read_text())["pairs_per_step"] == 2


def test_real_size_configs_have_the_published_parameter_counts():
    """--size real builds these (random init, no downloads): the counts of the published checkpoints, counted
    on the meta device (no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

    def count(build):
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())

    assert count(lambda: UNet2DConditionModel(**spo_round.sd15_unet_config())) == 859_520_964
    assert count(lambda: UNet2DConditionModel(**spo_round.sdxl_unet_config())) == 2_567_463_684
    assert count(lambda: AutoencoderKL(**spo_round.sd15_vae_config())) == 83_653_863
    assert count(lambda: AutoencoderKL(**spo_round.sdxl_vae_config())) == 83_653_863
    assert count(lambda: CLIPTextModel(spo_round.clip_l_text_config())) == 123_060_480
    assert count(lambda: CLIPTextModelWithProjection(spo_round.openclip_bigg_text_config())) == 694_659_840
    assert count(lambda: CLIPModel(spo_round.pickscore_clip_config())) == 986_109_441  # PickScore_v1 (ViT-H/14)


def test_fast_scoring_round_runs_and_says_its_pairs_differ(tmp_path, capsys):
    out = spo_round.main(["--device", "cpu", "--prompts", "2", "--steps", "6", "--candidates", "3",
                          "--scoring-decoder", "tiny", "--structure", "ours"])
    assert out["ours_options"]["scoring_decoder"] == "AutoencoderTiny" and not out["same_maths"]
    assert out["structures"]["ours"]["kept_pairs_per_round"] > 0
    assert out["structures"]["ours"]["breakdown_s"]["x0_decode"] > 0  # the tiny decoder's time is the decode's
    assert out["structures"]["ours"]["vae_decode_calls_per_round"] == 0
