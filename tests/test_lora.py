"""The saved LoRA reloads as the model that was trained: same outputs, alpha / r scaling kept."""

import dataclasses
import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import LORA_WEIGHTS_FILE, add_lora, load_lora, save_lora

# alpha != rank: the loaders' default (alpha = rank, scale 1) would give another model than scale 2
CFG = dataclasses.replace(load_profile("digits").train_spo, lora_rank=4, lora_alpha=8.0, mixed_precision="fp32")


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, tmp_path_factory):
    """(model, lora dir, inputs, outputs): a tiny UNet with a non-zero LoRA (as after training), saved."""
    model = load_diffusion_model(str(tiny_sd_dir))
    add_lora(model.unet, CFG)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1  # B = 0 would hide the scale
    lora_dir = tmp_path_factory.mktemp("spo") / "lora"
    save_lora(model.unet, lora_dir)
    embeds = model.encode_prompts(["one", "two"]).hidden_states
    inputs = (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([300, 700]), embeds)
    return model, lora_dir, inputs, unet_out(model.unet, inputs)


def unet_out(unet, inputs):
    latents, t, embeds = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=embeds).sample


def test_trained_lora_changes_the_output(trained, tiny_sd_dir):
    _, _, inputs, out = trained
    base = unet_out(load_diffusion_model(str(tiny_sd_dir)).unet, inputs)
    assert (out - base).abs().max() > 1e-3  # else the reload tests below would prove nothing


def test_saved_file_carries_alpha_and_rank(trained):
    _, lora_dir, _, _ = trained
    with safe_open(str(lora_dir / LORA_WEIGHTS_FILE), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 8.0 and metadata["unet.r"] == 4


def test_load_lora_reproduces_the_trained_outputs(trained, tiny_sd_dir):
    _, lora_dir, inputs, out = trained
    fresh = load_diffusion_model(str(tiny_sd_dir))
    load_lora(fresh.unet, lora_dir)
    torch.testing.assert_close(unet_out(fresh.unet, inputs), out, atol=1e-6, rtol=0)


def test_pipeline_load_lora_weights_reproduces_the_trained_outputs(trained, tiny_sd_dir):
    """The path of the registered pyfunc model (spo.stages.register.SPOLoRAPipeline)."""
    _, lora_dir, inputs, out = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS_FILE)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), out, atol=1e-6, rtol=0)


@pytest.mark.slow  # two subprocesses
def test_the_adapter_file_does_not_depend_on_the_hash_seed(tiny_sd_dir, tmp_path):
    """peft stores target_modules as a set; the saved file must be the same bytes in every process."""
    import subprocess
    import sys

    code = ("import sys; import torch; from spo.config import load_profile;"
            "from spo.models.diffusion_model import load_diffusion_model; from spo.models.lora import add_lora, save_lora;"
            "from pathlib import Path; m = load_diffusion_model(sys.argv[1]); torch.manual_seed(0);"
            "add_lora(m.unet, load_profile('digits').train_spo); save_lora(m.unet, Path(sys.argv[2]) / 'lora')")
    # this process (its own hash seed, random unless PYTHONHASHSEED is set) and two fresh ones
    model = load_diffusion_model(str(tiny_sd_dir))
    torch.manual_seed(0)
    add_lora(model.unet, load_profile("digits").train_spo)
    save_lora(model.unet, tmp_path / "here" / "lora")
    files = [(tmp_path / "here" / "lora" / LORA_WEIGHTS_FILE).read_bytes()]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_sd_dir), str(tmp_path / seed)],
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]  # side by side
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    files += [(tmp_path / seed / "lora" / LORA_WEIGHTS_FILE).read_bytes() for seed in ("1", "2")]
    assert files[0] == files[1] == files[2]
