"""The published SPM checkpoint layout (RockeyCoss/SPO) on a tiny random CLIP.

The published side is rebuilt here from the published code, not from our exporter: `published_skeleton` is a
`CLIPModel` wrapped as `.model` (trainer/models/step_aware_preference_model.py) with the attributes that
time_conditioned_clip.py adds (`t_embedder.mlp`, per-layer and pooled `adaLN_modulation`), and
`published_image_features` transcribes that file's forward line by line (with a hand-written attention)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from test_step_aware_preference_model import (
    PROMPTS,
    build_tiny_clip,
    perturb_time_conditioning,
    random_images,
)
from torch import nn
from transformers import CLIPModel

from spo.config import MissingPathError
from spo.models.published_spm_checkpoint import (
    PUBLISHED_FILES,
    PUBLISHED_REPO,
    load_published,
    load_published_state_dict,
    published_state_dict,
    read_checkpoint,
    resolve_checkpoint_file,
    save_published,
)
from spo.models.step_aware_preference_model import StepAwarePreferenceModel

TIMESTEPS = (0, 1, 251, 501, 701, 951, 999)
POSITION_ID_KEYS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def new_spm(clip_dir: Path) -> StepAwarePreferenceModel:
    return StepAwarePreferenceModel.from_backbone(str(clip_dir)).eval()


# ----------------------------------------------------------------------------------------------------
# the published model, rebuilt from the published code


class PublishedWrapper(nn.Module):
    """trainer/models/step_aware_preference_model.py: `self.model = HFTimeConditionedCLIPModel(...)`."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model


def published_skeleton(clip_dir: Path, seed: int = 0) -> PublishedWrapper:
    """CLIPModel + the attributes time_conditioned_clip.py adds, random (non-identity) values throughout."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    d = model.config.vision_config.hidden_size
    model.t_embedder = nn.Module()  # TimestepEmbedder(hidden_size, frequency_embedding_size=256)
    model.t_embedder.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
    for layer in model.vision_model.encoder.layers:  # TimeConditionedCLIPEncoderLayer
        layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))
    model.vision_model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d, bias=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "t_embedder" in name or "adaLN_modulation" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        model.visual_projection.weight.mul_(1.5)  # a fine-tuned backbone: CLIP keys must be carried too
        model.vision_model.post_layernorm.bias.add_(0.1)
    return PublishedWrapper(model).eval()


def published_file_state(skeleton: PublishedWrapper) -> dict[str, torch.Tensor]:
    """What zero_to_fp32 wrote under transformers 4.27: parameters + the position_ids buffers as float32."""
    state = {k: v.clone() for k, v in skeleton.state_dict().items()}
    for key in POSITION_ID_KEYS:
        module = skeleton
        for part in key.split(".")[:-1]:
            module = getattr(module, part)
        state[key] = module.position_ids.float().clone()
    return state


def _attention(attn: nn.Module, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """CLIPAttention without masks, by hand: softmax(q·kᵀ/√d)·v, heads merged, out_proj."""
    b, n, d = x.shape
    heads = [proj(x).view(b, n, num_heads, d // num_heads).transpose(1, 2)
             for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    q, k, v = heads
    weights = (q @ k.transpose(-1, -2) * (d // num_heads) ** -0.5).softmax(dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, d))


def published_image_features(skeleton: PublishedWrapper, pixel_values: torch.Tensor,
                             time: torch.Tensor) -> torch.Tensor:
    """HFTimeConditionedCLIPModel.get_image_features, transcribed from time_conditioned_clip.py."""
    m = skeleton.model
    time = time.to(pixel_values.dtype)  # :392
    half = 256 // 2  # timestep_embedding, :297-305
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = time[:, None].float() * freqs[None]
    time_cond = m.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    vision, heads = m.vision_model, m.config.vision_config.num_attention_heads
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))  # :244-245
    for layer in vision.encoder.layers:  # :77-96
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.adaLN_modulation(time_cond).chunk(6, 1)
        residual = hidden
        x = layer.layer_norm1(hidden) * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        hidden = residual + _attention(layer.self_attn, x, heads) * gate_msa.unsqueeze(1)
        residual = hidden
        x = layer.layer_norm2(hidden) * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        hidden = residual + layer.mlp(x) * gate_mlp.unsqueeze(1)
    pooled = vision.post_layernorm(hidden[:, 0, :])  # :255-260
    shift, scale = vision.adaLN_modulation(time_cond).chunk(2, dim=1)
    return m.visual_projection(pooled * (1 + scale) + shift)  # :403-404


def published_scores(skeleton: PublishedWrapper, spm: StepAwarePreferenceModel, images: torch.Tensor,
                     time: torch.Tensor) -> torch.Tensor:
    """SPO's get_preference_score maths (normalise, logit_scale.exp()·dot) on our pixel values and text."""
    features = published_image_features(skeleton, spm.pixel_values(images), time)
    image_embeds = features / features.norm(dim=-1, keepdim=True)
    return skeleton.model.logit_scale.exp() * (image_embeds * spm.encode_text(PROMPTS)).sum(-1)


def published_loader_accepts(skeleton: PublishedWrapper, state: dict[str, torch.Tensor]) -> list[str]:
    """The SPO loader (preference_models/models/step_aware_preference_model.py:26-36); returns unexpected keys."""
    missing, unexpected = skeleton.load_state_dict(state, strict=False)
    for key in unexpected:
        current = skeleton
        for sub_key in key.split("."):
            current = getattr(current, sub_key)
        assert torch.all(state[key] == current), f"unexpected key {key} have different values"
    assert len(missing) == 0, f"missing keys: {missing}"
    return sorted(unexpected)


def set_time_weights_directly(spm: StepAwarePreferenceModel, skeleton: PublishedWrapper) -> None:
    """The reference: copy the skeleton's weights attribute by attribute, no state-dict keys involved."""
    m = skeleton.model
    with torch.no_grad():
        spm.clip.load_state_dict({k: v for k, v in m.state_dict().items()
                                  if "t_embedder" not in k and "adaLN_modulation" not in k})
        for ours, theirs in ((spm.time_embedder.mlp[0], m.t_embedder.mlp[0]),
                             (spm.time_embedder.mlp[2], m.t_embedder.mlp[2]),
                             (spm.pooled_modulation[1], m.vision_model.adaLN_modulation[1]),
                             *((mod[1], layer.adaLN_modulation[1])
                               for mod, layer in zip(spm.block_modulations, m.vision_model.encoder.layers))):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)


def all_t_scores(spm: StepAwarePreferenceModel, images: torch.Tensor) -> dict[int, torch.Tensor]:
    text = spm.encode_text(PROMPTS)
    return {t: spm.score(images, text, torch.full((images.shape[0],), t)) for t in TIMESTEPS}


# ----------------------------------------------------------------------------------------------------
# layout and forward


@torch.no_grad()
def test_published_state_loads_and_scores_like_weights_set_directly(clip_dir):
    skeleton = published_skeleton(clip_dir)
    loaded = new_spm(clip_dir)
    load_published_state_dict(loaded, published_file_state(skeleton))
    direct = new_spm(clip_dir)
    set_time_weights_directly(direct, skeleton)
    images = random_images()
    got, want = all_t_scores(loaded, images), all_t_scores(direct, images)
    for t in TIMESTEPS:
        assert torch.equal(got[t], want[t]), t
    assert (got[0] - got[951]).abs().min() > 1e-4  # the time weights matter: the check is not vacuous
    assert (got[0] - loaded.backbone_score(images, PROMPTS)).abs().min() > 1e-4


@torch.no_grad()
def test_our_forward_equals_the_published_forward(clip_dir):
    """Independent transcription of the published forward vs ours, same weights, per-sample timesteps."""
    skeleton = published_skeleton(clip_dir, seed=3)
    spm = new_spm(clip_dir)
    load_published_state_dict(spm, published_file_state(skeleton))
    images = random_images(seed=5)
    for t in (torch.tensor([0, 251, 701, 999]), torch.full((4,), 501)):
        ours = spm.score(images, spm.encode_text(PROMPTS), t)
        torch.testing.assert_close(ours, published_scores(skeleton, spm, images, t), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_export_is_accepted_by_the_published_loader_and_scores_the_same_there(clip_dir):
    spm = new_spm(clip_dir)
    perturb_time_conditioning(spm, seed=7)
    spm.clip.visual_projection.weight.mul_(0.7)
    skeleton = published_skeleton(clip_dir, seed=11)  # different values everywhere: the load must replace them
    unexpected = published_loader_accepts(skeleton, published_state_dict(spm))
    assert unexpected == sorted(POSITION_ID_KEYS)  # transformers 5: non-persistent buffers, equal values
    # without the position ids the layout is exactly the published module's state dict (strict)
    skeleton.load_state_dict(published_state_dict(spm, include_position_ids=False), strict=True)
    images = random_images(seed=2)
    t = torch.tensor([0, 300, 600, 999])
    torch.testing.assert_close(published_scores(skeleton, spm, images, t),
                               spm.score(images, spm.encode_text(PROMPTS), t), rtol=1e-5, atol=1e-5)


def test_exported_key_names_are_the_published_ones(clip_dir):
    """Spelled out from time_conditioned_clip.py's attribute names (2 vision layers in the tiny CLIP)."""
    keys = set(published_state_dict(new_spm(clip_dir)))
    time_keys = {k for k in keys if "t_embedder" in k or "adaLN" in k}
    assert time_keys == {f"model.{p}.{w}" for w in ("weight", "bias") for p in (
        "t_embedder.mlp.0", "t_embedder.mlp.2", "vision_model.adaLN_modulation.1",
        "vision_model.encoder.layers.0.adaLN_modulation.1", "vision_model.encoder.layers.1.adaLN_modulation.1")}
    assert {"model.logit_scale", "model.visual_projection.weight", "model.vision_model.pre_layrnorm.weight",
            "model.text_model.final_layer_norm.bias", *POSITION_ID_KEYS} <= keys
    assert all(k.startswith("model.") for k in keys)


@torch.no_grad()
def test_export_then_load_round_trip_is_exact(clip_dir):
    spm = new_spm(clip_dir)
    perturb_time_conditioning(spm, seed=4)
    spm.clip.text_projection.weight.add_(0.05)
    state = published_state_dict(spm)
    other = new_spm(clip_dir)
    load_published_state_dict(other, state)
    mine, theirs = spm.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    again = published_state_dict(other)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


@torch.no_grad()
def test_identity_spm_is_still_the_backbone_after_export_and_load(clip_dir):
    target = new_spm(clip_dir)
    perturb_time_conditioning(target, seed=9)  # so the load has to restore the identity
    load_published_state_dict(target, published_state_dict(new_spm(clip_dir)))
    images = random_images(seed=1)
    backbone = target.backbone_score(images, PROMPTS)
    for t, scores in all_t_scores(target, images).items():
        assert torch.equal(scores, backbone), t


@torch.no_grad()
def test_fp16_state_is_cast_to_the_model_dtype(clip_dir):
    skeleton = published_skeleton(clip_dir, seed=2)
    half = {k: v.half() if v.is_floating_point() else v for k, v in published_file_state(skeleton).items()}
    spm = new_spm(clip_dir)
    load_published_state_dict(spm, half)
    assert {p.dtype for p in spm.parameters()} == {torch.float32}
    assert torch.equal(spm.pooled_modulation[1].weight, half["model.vision_model.adaLN_modulation.1.weight"].float())
    assert torch.equal(spm.clip.visual_projection.weight, half["model.visual_projection.weight"].float())


# ----------------------------------------------------------------------------------------------------
# bad checkpoints: clear errors, model untouched


def _untouched(spm: StepAwarePreferenceModel, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in spm.state_dict().items())


def _bad_load(spm: StepAwarePreferenceModel, state: dict[str, torch.Tensor], match: str) -> None:
    before = {k: v.clone() for k, v in spm.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_published_state_dict(spm, state)
    assert _untouched(spm, before)


def test_missing_key_is_named(clip_dir):
    spm = new_spm(clip_dir)
    state = published_file_state(published_skeleton(clip_dir))
    del state["model.vision_model.encoder.layers.1.adaLN_modulation.1.bias"]
    _bad_load(spm, state, r"missing keys: model\.vision_model\.encoder\.layers\.1\.adaLN_modulation\.1\.bias")


def test_unexpected_key_is_named(clip_dir):
    spm = new_spm(clip_dir)
    state = published_file_state(published_skeleton(clip_dir))
    state["model.vision_model.encoder.layers.2.adaLN_modulation.1.weight"] = torch.zeros(192, 32)
    _bad_load(spm, state, r"unexpected keys: model\.vision_model\.encoder\.layers\.2\.adaLN_modulation")


def test_a_plain_clip_state_dict_says_the_prefix_is_missing(clip_dir):
    spm = new_spm(clip_dir)
    bare = {k[len("model."):]: v for k, v in published_file_state(published_skeleton(clip_dir)).items()}
    _bad_load(spm, bare, r"no key starts with 'model\.'")


def test_wrong_shape_names_the_key_and_both_shapes(clip_dir):
    """E.g. a ViT-H/14 checkpoint (D = 1280) into the tiny backbone (D = 32)."""
    spm = new_spm(clip_dir)
    state = published_file_state(published_skeleton(clip_dir))
    key = "model.vision_model.encoder.layers.0.adaLN_modulation.1.weight"
    state[key] = torch.zeros(6 * 1280, 1280)
    _bad_load(spm, state, re.escape(f"{key}: checkpoint (7680, 1280) vs model (192, 32)"))


def test_non_finite_values_and_bad_position_ids_are_refused(clip_dir):
    spm = new_spm(clip_dir)
    good = published_file_state(published_skeleton(clip_dir))
    state = dict(good, **{"model.t_embedder.mlp.2.bias": torch.full((32,), float("nan"))})
    _bad_load(spm, state, r"model\.t_embedder\.mlp\.2\.bias: non-finite")
    state = dict(good, **{POSITION_ID_KEYS[1]: torch.zeros_like(good[POSITION_ID_KEYS[1]])})
    _bad_load(spm, state, r"vision_model\.embeddings\.position_ids: expected arange")


# ----------------------------------------------------------------------------------------------------
# files


def test_bin_file_and_directory_resolve_and_load(clip_dir, tmp_path):
    skeleton = published_skeleton(clip_dir)
    file = tmp_path / "ckpts" / PUBLISHED_FILES["sd15"]
    file.parent.mkdir()
    torch.save(published_file_state(skeleton), file)
    assert resolve_checkpoint_file(str(file), "sd15") == file
    assert resolve_checkpoint_file(str(file.parent), "sd15") == file
    spm = new_spm(clip_dir)
    assert load_published(spm, str(file.parent), "sd15") == file
    assert torch.equal(spm.pooled_modulation[1].bias, skeleton.model.vision_model.adaLN_modulation[1].bias)


def test_safetensors_file_resolves_and_reads(clip_dir, tmp_path):
    spm = new_spm(clip_dir)
    perturb_time_conditioning(spm)
    save_published(spm, tmp_path / "spm.safetensors")
    assert resolve_checkpoint_file(str(tmp_path / "spm.safetensors"), "sdxl") == tmp_path / "spm.safetensors"
    state = read_checkpoint(tmp_path / "spm.safetensors")
    expected = published_state_dict(spm)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


@pytest.mark.parametrize("location", ["/no/such/dir", "./nope", "nope.bin", "a/b/c", "missing"])
def test_nonexistent_local_path_is_a_missing_path_error(tmp_path, location, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingPathError, match=re.escape(location)):
        resolve_checkpoint_file(location, "sd15")


def test_directory_without_the_architecture_file_names_it(tmp_path):
    torch.save({}, tmp_path / PUBLISHED_FILES["sd15"])
    with pytest.raises(MissingPathError, match=re.escape(PUBLISHED_FILES["sdxl"])):
        resolve_checkpoint_file(str(tmp_path), "sdxl")


def test_unknown_architecture_and_wrong_suffix_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sd3"):
        resolve_checkpoint_file(str(tmp_path), "sd3")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="weights.txt"):
        resolve_checkpoint_file(str(tmp_path / "weights.txt"), "sd15")


def test_hub_repo_id_downloads_the_architecture_file_with_the_token(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, token=None):
        calls.append((repo_id, filename, token))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert resolve_checkpoint_file(PUBLISHED_REPO, "sdxl") == tmp_path / PUBLISHED_FILES["sdxl"]
    assert calls == [(PUBLISHED_REPO, PUBLISHED_FILES["sdxl"], "hf_test")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, filename, token=None):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MissingPathError, match=f"{PUBLISHED_FILES['sd15']}.*{PUBLISHED_REPO}.*offline"):
        resolve_checkpoint_file(PUBLISHED_REPO, "sd15")


def test_unreadable_checkpoint_names_the_file(tmp_path):
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.bin"):
        read_checkpoint(tmp_path / "broken.bin")
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="list.bin.*state dict"):
        read_checkpoint(tmp_path / "list.bin")


def test_save_published_writes_a_loadable_bin_atomically(clip_dir, tmp_path, monkeypatch):
    spm = new_spm(clip_dir)
    perturb_time_conditioning(spm, seed=5)
    path = tmp_path / "out" / "spm.bin"
    save_published(spm, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = published_state_dict(spm)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert os.listdir(path.parent) == ["spm.bin"]
    # a failing write leaves the previous file intact and no temporary file behind
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_published(new_spm(clip_dir), path)
    assert os.listdir(path.parent) == ["spm.bin"]
    kept = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
