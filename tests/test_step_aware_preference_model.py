"""The step-aware preference model on a tiny random-init CLIPModel: identity at init, t-dependence,
save/load, and the torch preprocessing against transformers' own PIL-based CLIPImageProcessor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import write_char_tokenizer
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
)

from spo.models.preference_inputs import ClipImageTransform, clip_pixel_values
from spo.models.step_aware_preference_model import (
    TIME_WEIGHTS_FILE,
    StepAwarePreferenceModel,
    timestep_sinusoids,
)

PROMPTS = ["a seven", "the digit two", "nine", "a handwritten one"]


def build_tiny_clip(path: Path, *, image_size: int = 16, seed: int = 0,
                    mean: tuple[float, ...] | None = None) -> Path:
    """A CLIPModel (16x16 images, patch 4, hidden 32, 2 layers) + CLIPProcessor saved in one dir."""
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(path / "_tokenizer", max_length=16)
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=4, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    extra = {"image_mean": list(mean)} if mean else {}
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size}, **extra)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def spm(clip_dir) -> StepAwarePreferenceModel:
    return StepAwarePreferenceModel.from_backbone(str(clip_dir)).eval()


def random_images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def perturb_time_conditioning(spm: StepAwarePreferenceModel, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in spm.time_conditioning_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def test_sinusoidal_embedding_matches_the_dit_formula():
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_sinusoids(t)
    assert emb.shape == (4, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    i, tt = 37, 500
    freq = math.exp(-math.log(10000) * i / 128)
    assert emb[2, i].item() == pytest.approx(math.cos(tt * freq), abs=1e-5)
    assert emb[2, 128 + i].item() == pytest.approx(math.sin(tt * freq), abs=1e-5)


def test_identity_initialisation_values(spm):
    d = spm.clip.config.vision_config.hidden_size
    for modulation in spm.block_modulations:
        linear = modulation[-1]
        assert torch.count_nonzero(linear.weight) == 0
        expected = torch.cat([torch.zeros(2 * d), torch.ones(d), torch.zeros(2 * d), torch.ones(d)])
        assert torch.equal(linear.bias, expected)  # not the published all-ones bias
    assert torch.count_nonzero(spm.pooled_modulation[-1].weight) == 0
    assert torch.count_nonzero(spm.pooled_modulation[-1].bias) == 0
    assert len(spm.block_modulations) == spm.clip.config.vision_config.num_hidden_layers


@torch.no_grad()
def test_at_init_scores_equal_the_plain_backbone_exactly_at_every_t(spm):
    images = random_images()
    backbone = spm.backbone_score(images, PROMPTS)
    text = spm.encode_text(PROMPTS)
    for t in (0, 1, 251, 501, 951, 999):
        scores = spm.score(images, text, torch.full((4,), t))
        assert torch.equal(scores, backbone), t
    mixed = spm.score(images, text, torch.tensor([0, 300, 700, 999]))
    assert torch.equal(mixed, backbone)
    assert backbone.std() > 0  # the check is not vacuous


@torch.no_grad()
def test_backbone_score_is_transformers_clip(spm, clip_dir):
    """backbone_score == CLIPModel's own logits_per_image diagonal with pixel values from our transform."""
    images = random_images()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokens = spm.processor.tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    out = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
               pixel_values=clip_pixel_values(images, spm.image_transform))
    torch.testing.assert_close(spm.backbone_score(images, PROMPTS), out.logits_per_image.diagonal(),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_perturbed_time_weights_make_scores_depend_on_t(spm):
    images = random_images()
    text = spm.encode_text(PROMPTS)
    backbone = spm.backbone_score(images, PROMPTS)
    perturb_time_conditioning(spm)
    s0 = spm.score(images, text, torch.zeros(4, dtype=torch.long))
    s500 = spm.score(images, text, torch.full((4,), 500))
    assert (s0 - s500).abs().min() > 1e-4
    assert (s0 - backbone).abs().min() > 1e-4
    # per-sample timesteps: row i of a mixed batch equals the row of the single-t batch
    mixed = spm.score(images, text, torch.tensor([0, 500, 0, 500]))
    torch.testing.assert_close(mixed, torch.stack([s0[0], s500[1], s0[2], s500[3]]), rtol=1e-5, atol=1e-5)
    # the text tower is unchanged
    torch.testing.assert_close(text, spm.encode_text(PROMPTS))


def test_gradients_reach_every_parameter_after_time_weights_move(spm):
    perturb_time_conditioning(spm)
    images = random_images()
    scores = spm.score(images, spm.encode_text(PROMPTS), torch.tensor([3, 300, 600, 900]))
    scores.sum().backward()
    assert [n for n, p in spm.named_parameters() if p.grad is None] == []  # text tower included
    assert all(p.grad.abs().sum() > 0 for p in spm.time_conditioning_parameters())


@torch.no_grad()
def test_save_and_load_round_trip_gives_identical_scores(spm, tmp_path):
    perturb_time_conditioning(spm)
    with torch.no_grad():
        spm.clip.visual_projection.weight.mul_(1.5)  # a fine-tuned backbone is saved too
    images = random_images()
    t = torch.tensor([0, 251, 701, 951])
    before = spm.score(images, spm.encode_text(PROMPTS), t)
    spm.save_pretrained(tmp_path / "spm")
    loaded = StepAwarePreferenceModel.from_pretrained(tmp_path / "spm").eval()
    assert torch.equal(loaded.score(images, loaded.encode_text(PROMPTS), t), before)
    # the directory is also a plain CLIP dir holding the fine-tuned backbone
    plain = CLIPModel.from_pretrained(tmp_path / "spm")
    assert torch.equal(plain.visual_projection.weight, spm.clip.visual_projection.weight)
    assert (tmp_path / "spm" / TIME_WEIGHTS_FILE).is_file()


def test_from_pretrained_on_a_plain_clip_dir_is_a_clear_error(clip_dir):
    with pytest.raises(FileNotFoundError, match="spm.json"):
        StepAwarePreferenceModel.from_pretrained(clip_dir)


def test_missing_backbone_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="preference backbone"):
        StepAwarePreferenceModel.from_backbone(str(tmp_path / "nope"))


def test_separate_processor_is_used(clip_dir, tmp_path):
    other = build_tiny_clip(tmp_path / "other", mean=(0.1, 0.2, 0.3))
    spm = StepAwarePreferenceModel.from_backbone(str(clip_dir), processor=str(other))
    assert spm.image_transform.mean == pytest.approx((0.1, 0.2, 0.3))


# ----------------------------------------------------------------------------------------------------
# preprocessing


def smooth_uint8_image(height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize("height,width", [(24, 32), (32, 24), (40, 40), (12, 20), (16, 16)])
def test_preprocessing_matches_transformers_pil_processor(height, width):
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = smooth_uint8_image(height, width, seed=height * width)
    expected = torch.tensor(processor(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"])
    images = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = clip_pixel_values(images, ClipImageTransform.from_image_processor(processor))
    assert ours.shape == expected.shape == (1, 3, 16, 16)
    diff = (ours - expected).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.01  # ≈ one uint8 level of PIL's rounding, / std


def test_preprocessing_matches_a_hand_written_pil_pipeline():
    """Independent of transformers: PIL bicubic short-side resize, centre crop, /255, normalise."""
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    pixels = smooth_uint8_image(30, 45, seed=3)
    resized = np.asarray(Image.fromarray(pixels).resize((24, 16), Image.BICUBIC), dtype=np.float32) / 255
    cropped = resized[:, 4:20]
    mean_t, std_t = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    expected = (torch.from_numpy(cropped).permute(2, 0, 1) - mean_t) / std_t
    images = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = clip_pixel_values(images, ClipImageTransform(16, (16, 16), mean, std))[0]
    diff = (ours - expected).abs()
    assert diff.max() < 0.03 and diff.mean() < 0.01


def test_preprocessing_is_differentiable():
    images = random_images(2, size=24).requires_grad_(True)
    out = clip_pixel_values(images, ClipImageTransform(16, (16, 16), (0.5,) * 3, (0.5,) * 3))
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_the_spm_resizes_as_the_published_trainer_without_antialias(tmp_path):
    """spm_task.py: clamp to [0, 1], F.interpolate(224, bicubic, align_corners=False) without antialias,
    clamp, normalise. Antialiasing (PIL's way) would give other pixels for a 512 px x̂0."""
    import torch.nn.functional as F

    transform = ClipImageTransform(224, (224, 224), (0.48145466, 0.4578275, 0.40821073),
                                   (0.26862954, 0.26130258, 0.27577711))
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    pixels = (images / 2 + 0.5).clamp(0, 1)
    expected = F.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(transform.mean).view(1, 3, 1, 1), torch.tensor(transform.std).view(1, 3, 1, 1)
    published = clip_pixel_values(images, transform.as_published_spm())
    assert torch.allclose(published, (expected - mean) / std, atol=1e-6)
    assert not torch.allclose(clip_pixel_values(images, transform), published, atol=1e-3)
    spm = StepAwarePreferenceModel.from_backbone(str(build_tiny_clip(tmp_path / "clip")))
    assert spm.image_transform.antialias is False
