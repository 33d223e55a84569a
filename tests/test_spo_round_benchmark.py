"""benchmarks/spo_round.py on CPU: both structures run, and they are the same maths (same kept pairs,
same losses); only where the work is batched differs."""

import json
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import spo_round  # noqa: E402


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_ours_and_published_keep_the_same_pairs_and_losses(arch, tmp_path, capsys):
    out = spo_round.main(["--device", "cpu", "--arch", arch, "--prompts", "2", "--steps", "6", "--candidates", "3",
                          "--pairs-per-batch", "4", "--out", str(tmp_path / "round.json")])
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
