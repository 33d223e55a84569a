"""What users load our outputs with: `pipe.load_lora_weights` into the real SD1.5 / SDXL pipeline classes,
a full fine-tuned UNet dir, and `spo export --merged` (a pipeline with the fine-tune baked in).

Every check compares UNet outputs on the same inputs with the model that was trained, and first shows that
model differs from the base (else equality would prove nothing).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open

from spo.cli import main as spo_main
from spo.cli import use_profile
from spo.config import load_profile
from spo.models.diffusion_model import DiffusionModel, load_diffusion_model
from spo.models.export import export_merged
from spo.models.lora import (
    FULL_UNET_SUBDIR,
    LORA_WEIGHTS_FILE,
    add_lora,
    load_full_unet,
    load_lora,
    save_full_unet,
    save_lora,
)
from spo.standins.models import build_sd15, build_sdxl, build_sdxl_fp16_fix_vae

ARCHITECTURES = ("sd15", "sdxl")
BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl}
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
# alpha != rank: a loader that assumed alpha = rank (scale 1, not 2) would give another model
CFG = dataclasses.replace(load_profile("digits").train_spo, lora_rank=4, lora_alpha=8.0, mixed_precision="fp32")


@dataclass
class Trained:
    """A stand-in base pipeline dir, a non-zero LoRA trained on it (saved), and its UNet's outputs."""

    architecture: str
    base_dir: Path
    lora_dir: Path
    model: DiffusionModel
    inputs: tuple[torch.Tensor, torch.Tensor, dict]  # latents (2, 4, 8, 8), timesteps (2,), unet kwargs
    out: torch.Tensor


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and lose 5x when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_out(unet: UNet2DConditionModel, inputs) -> torch.Tensor:
    latents, t, kwargs = inputs
    with torch.no_grad():
        return unet(latents, t, **kwargs).sample


@pytest.fixture(scope="module", params=ARCHITECTURES)
def trained(request, tmp_path_factory) -> Trained:
    architecture = request.param
    root = tmp_path_factory.mktemp(architecture)
    base_dir = BUILDERS[architecture](root / "base")
    model = load_diffusion_model(str(base_dir))
    add_lora(model.unet, CFG)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1  # B = 0 is the identity
    save_lora(model.unet, root / "lora", architecture)
    # SDXL: encoder states of both text encoders, and added_cond_kwargs (pooled text_embeds, time_ids)
    kwargs = model.encode_prompts(["one", "two"]).unet_kwargs()
    inputs = (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([300, 700]), kwargs)
    return Trained(architecture, base_dir, root / "lora", model, inputs, unet_out(model.unet, inputs))


@pytest.fixture(scope="module")
def base_outputs(trained) -> torch.Tensor:
    return unet_out(load_diffusion_model(str(trained.base_dir)).unet, trained.inputs)


def test_the_trained_lora_changes_the_output(trained, base_outputs):
    assert (trained.out - base_outputs).abs().max() > 1e-3  # else the equalities below would prove nothing


def test_the_file_carries_rank_alpha_and_sorted_targets(trained):
    with safe_open(str(trained.lora_dir / LORA_WEIGHTS_FILE), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8.0
    assert metadata["unet.target_modules"] == sorted(CFG.lora_targets)


def test_the_pipeline_class_loads_the_lora_with_load_lora_weights(trained, base_outputs):
    """What a user runs: the real StableDiffusionPipeline / StableDiffusionXLPipeline, no weight_name."""
    pipe = PIPELINES[trained.architecture].from_pretrained(trained.base_dir)
    pipe.load_lora_weights(str(trained.lora_dir))
    out = unet_out(pipe.unet, trained.inputs)
    torch.testing.assert_close(out, trained.out, atol=1e-6, rtol=0)


def test_load_lora_reproduces_the_trained_unet(trained):
    fresh = load_diffusion_model(str(trained.base_dir))
    load_lora(fresh.unet, trained.lora_dir)
    torch.testing.assert_close(unet_out(fresh.unet, trained.inputs), trained.out, atol=1e-6, rtol=0)


def test_export_merged_fuses_the_lora(trained, tmp_path):
    out_dir = export_merged(str(trained.base_dir), tmp_path / "merged", lora_dir=trained.lora_dir)
    merged = load_diffusion_model(str(out_dir))
    assert merged.architecture == trained.architecture
    # fused: W + scale * B A is one weight now (fp32 rounding of the sum), no LoRA layers left
    torch.testing.assert_close(unet_out(merged.unet, trained.inputs), trained.out, atol=1e-5, rtol=1e-5)
    with safe_open(str(out_dir / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert not [key for key in f.keys() if "lora" in key or "base_layer" in key]


def finetuned_unet(trained: Trained) -> UNet2DConditionModel:
    """The base UNet with every weight moved a little: a stand-in for a full fine-tune."""
    unet = load_diffusion_model(str(trained.base_dir)).unet
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    return unet


def test_a_full_unet_round_trips_and_exports(trained, base_outputs, tmp_path):
    unet = finetuned_unet(trained)
    expected = unet_out(unet, trained.inputs)
    assert (expected - base_outputs).abs().max() > 1e-3
    assert save_full_unet(unet, tmp_path / "spo") == tmp_path / "spo" / FULL_UNET_SUBDIR
    torch.testing.assert_close(unet_out(load_full_unet(tmp_path / "spo"), trained.inputs), expected, atol=0, rtol=0)
    out_dir = export_merged(str(trained.base_dir), tmp_path / "merged", unet_dir=tmp_path / "spo")
    torch.testing.assert_close(unet_out(load_diffusion_model(str(out_dir)).unet, trained.inputs), expected,
                               atol=0, rtol=0)


def test_save_full_unet_refuses_a_unet_with_a_lora(trained, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapter"):
        save_full_unet(trained.model.unet, tmp_path)


def test_export_replaces_the_vae(tmp_path):
    """SDXL with the fp16-fix VAE: the exported pipeline carries the replacement (force_upcast False)."""
    base_dir, vae_dir = build_sdxl(tmp_path / "sdxl"), build_sdxl_fp16_fix_vae(tmp_path / "vae", seed=1)
    save_full_unet(UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"), tmp_path / "spo")
    out_dir = export_merged(str(base_dir), tmp_path / "merged", unet_dir=tmp_path / "spo", vae=str(vae_dir))
    vae = load_diffusion_model(str(out_dir)).vae
    assert vae.config.force_upcast is False
    fix = load_diffusion_model(str(base_dir), vae=str(vae_dir)).vae
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), fix.state_dict().values()))


@pytest.mark.parametrize("trained", ["sd15"], indirect=True)  # one architecture is enough for the defaults
def test_cli_export_defaults_to_the_params_and_models_spo_lora(trained, tmp_path, monkeypatch, capsys):
    """`spo export --merged OUT` in a checkout: base from params.yaml, the LoRA from models/spo/lora."""

    monkeypatch.chdir(tmp_path)
    use_profile("sd15", Path("params.yaml"), [f"model.base_model={trained.base_dir}"])
    (tmp_path / "models" / "spo").mkdir(parents=True)
    (tmp_path / "models" / "spo" / "lora").symlink_to(trained.lora_dir)
    assert spo_main(["export", "--merged", "merged"]) == 0
    assert "merged <- " in capsys.readouterr().out
    out = unet_out(load_diffusion_model(str(tmp_path / "merged")).unet, trained.inputs)
    torch.testing.assert_close(out, trained.out, atol=1e-5, rtol=1e-5)


def test_cli_export_with_a_missing_lora_is_one_line_exit_2(tmp_path, capsys):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    code = spo_main(["export", "--merged", str(tmp_path / "out"), "--base", str(base_dir),
                     "--lora", str(tmp_path / "no_lora")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("spo export: LoRA weights not found") and "no_lora" in err
    assert not (tmp_path / "out").exists()


def test_cli_export_without_merged_says_what_is_missing(capsys):
    assert spo_main(["export"]) == 2
    assert "--merged OUT" in capsys.readouterr().err
