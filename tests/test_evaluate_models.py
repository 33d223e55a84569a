"""evaluate.models on the SD1.5 stand-in: a LoRA by path, a full UNet by path, images on disk, restarts."""

import numpy as np
import pytest
import torch

from spo.config import load_profile
from spo.diffusion.sampling import sample_images
from spo.evaluation.evaluated_models import resolve_models
from spo.evaluation.image_store import Sample, to_pil
from spo.evaluation.model_comparison import generate_missing, model_store, score_models
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import add_lora, save_full_unet, save_lora
from spo.standins.models import build_sd15

RESOLUTION, STEPS = 32, 2
SAMPLES = [Sample(0, "a red cube", 0), Sample(0, "a red cube", 1), Sample(1, "a blue ball", 0)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(base dir, LoRA dir, full-UNet dir): a non-zero LoRA and a perturbed UNet of the stand-in."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_models")
    base = build_sd15(root / "sd15")
    cfg = load_profile("sd15")
    model = load_diffusion_model(str(base))
    add_lora(model.unet, cfg.train_spo)
    gen = torch.Generator().manual_seed(0)
    for name, param in model.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3
    save_lora(model.unet, root / "lora")
    unet = load_diffusion_model(str(base)).unet
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    save_full_unet(unet, root / "full")
    return base, root / "lora", root / "full", unet


def config(base, lora, full):
    models = (f"[{{name: base}}, {{name: spo_lora, lora: {lora}}}, {{name: dpo_unet, unet: {full}}}]")
    return load_profile("sd15", [f"model.base_model={base}", "model.vae=null", f"model.resolution={RESOLUTION}",
                                 f"evaluate.num_inference_steps={STEPS}", f"evaluate.models={models}"])


def test_lora_and_full_unet_by_path_sample_what_they_name_and_restarts_skip_finished(checkpoints, tmp_path):
    base, lora, full, perturbed_unet = checkpoints
    models = resolve_models(config(base, lora, full), str(base), {}, device="cpu")
    assert [m.name for m in models] == ["base", "spo_lora", "dpo_unet"]
    assert models[1].spec.lora_dir == str(lora) and models[2].spec.unet_dir == str(full / "unet")
    assert len({m.fingerprint for m in models}) == 3

    images = tmp_path / "images"
    made = generate_missing(models, SAMPLES, images, batch_size=2, workers=0)
    assert made == {"base": 3, "spo_lora": 3, "dpo_unet": 3}
    pixels = {m.name: [np.asarray(im) for im in model_store(images, m).load(SAMPLES)] for m in models}
    # the full UNet's images are what that UNet samples in place of the base's (an independent sampling)
    reference = load_diffusion_model(str(base))
    reference.unet = perturbed_unet
    expected = to_pil(sample_images(reference, [s.prompt for s in SAMPLES], [s.seed for s in SAMPLES],
                                    resolution=RESOLUTION, num_inference_steps=STEPS, guidance_scale=5.0))
    # to one 8-bit level: the stage samples in batches of 2, this reference all 3 at once, and a batch's
    # float rounding can move a pixel across a level (one pixel of one image, measured)
    for a, b in zip(pixels["dpo_unet"], expected, strict=True):
        diff = np.abs(a.astype(int) - np.asarray(b).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    for name in ("spo_lora", "dpo_unet"):  # each model samples its own weights, not the base's
        assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(pixels[name], pixels["base"]))

    # a restart: only the missing image is sampled; it is the same image (no batch-mates, same seed)
    store = model_store(images, models[1])
    lost = store.path(SAMPLES[1])
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in images.rglob("*.png")}
    assert generate_missing(models, SAMPLES, images, batch_size=2, workers=0) == {"base": 0, "spo_lora": 1,
                                                                                  "dpo_unet": 0}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert np.array_equal(np.asarray(store.load([SAMPLES[1]])[0]), pixels["spo_lora"][1])


class MeanPixel:
    name = "mean_pixel"

    def score(self, prompts, images):
        return torch.tensor([np.asarray(im, dtype=np.float64).mean() for im in images])


def test_score_table_has_one_row_per_model_and_sample(checkpoints, tmp_path):
    base, lora, full, _ = checkpoints
    models = resolve_models(config(base, lora, full), str(base), {}, device="cpu")[:2]
    generate_missing(models, SAMPLES, tmp_path, batch_size=3, workers=0)
    table = score_models(models, SAMPLES, tmp_path, [MeanPixel()], batch_size=2)
    assert list(table.columns) == ["model", "prompt_index", "prompt", "seed", "mean_pixel"]
    assert list(table["model"]) == ["base"] * 3 + ["spo_lora"] * 3
    expected = [np.asarray(im, dtype=np.float64).mean() for im in model_store(tmp_path, models[1]).load(SAMPLES)]
    assert np.allclose(table["mean_pixel"][3:], expected)


def test_a_model_entry_naming_a_missing_path_says_which(checkpoints, tmp_path):
    base, lora, full, _ = checkpoints
    with pytest.raises(FileNotFoundError, match=r"evaluate.models\[1\] \(spo_lora\).*pytorch_lora_weights"):
        resolve_models(config(base, tmp_path / "nowhere", full), str(base), {}, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"evaluate.models\[2\] \(dpo_unet\).*full UNet not found"):
        resolve_models(config(base, lora, tmp_path), str(base), {}, device="cpu")
