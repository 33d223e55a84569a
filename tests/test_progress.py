"""What the terminal shows: progress bars with the loop's key numbers, logging, and no library noise."""

import dataclasses
import logging
import subprocess
import sys

import pytest
import torch
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import add_lora
from spo.tracking.progress import configure_logging, progress
from spo.tracking.tracker import MemoryTracker
from spo.training.spo_trainer import train_spo


class ConstantScorer:
    def __call__(self, images, prompt_index, timesteps):
        return torch.arange(images.shape[0], dtype=torch.float32) % 4  # distinct scores: every pair is kept


def test_train_spo_bar_shows_rounds_kept_pairs_and_loss(tmp_path, capsys):
    model = load_diffusion_model(str(build_tiny_sd(tmp_path / "sd")))
    cfg = dataclasses.replace(load_profile("digits").train_spo, mixed_precision="fp32", num_epochs=1, threshold=0.0,
                              prompts_per_round=2, prompts_per_rollout=2, pairs_per_step=4, pairs_per_batch=4,
                              num_inference_steps=6, branch_start_step=4)
    params = add_lora(model.unet, cfg)
    train_spo(model, lambda prompts: ConstantScorer(), ["one", "two", "three"], params, cfg, resolution=16, seed=0,
              tracker=MemoryTracker())
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("train_spo: 100%") and "2/2" in final and "round" in final
    assert "kept=1.00" in final and "loss=" in final and "step=" in final


def test_progress_can_be_switched_off(monkeypatch, capsys):
    monkeypatch.setenv("SPO_PROGRESS", "0")
    for _ in progress(range(3), desc="quiet"):
        pass
    assert "quiet" not in capsys.readouterr().err


def test_logging_goes_to_stderr_and_quiets_chatty_libraries(capsys):
    configure_logging()
    configure_logging()  # idempotent: one handler
    logging.getLogger("spo.prepare").info("backbone done in 1.0 s")
    logging.getLogger("mlflow.store").info("routine chatter")
    err = capsys.readouterr().err
    assert err.count("spo.prepare: backbone done in 1.0 s") == 1 and "routine chatter" not in err
    assert logging.getLogger("mlflow").level == logging.WARNING


@pytest.mark.slow  # two fresh interpreters importing diffusers (17 s)
@pytest.mark.parametrize("import_spo_first, noisy", [(True, False), (False, True)])
def test_transformers_torchvision_notice_is_filtered(import_spo_first, noisy):
    """diffusers imports CLIPImageProcessor; without torchvision transformers 5 warns on every start."""
    code = ("import spo; " if import_spo_first else "") + "from diffusers import StableDiffusionPipeline"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    if importlib_has_torchvision():
        pytest.skip("torchvision is installed: transformers does not fall back, so there is no notice")
    assert ("requires torchvision (not installed)" in err) == noisy


def importlib_has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None
