"""Stand-ins of the real architectures and data (DESIGN 2): they load through the real classes, carry the
real configs' shape and key values, run a forward pass, and the Pick-a-Pic mirror has the real schema."""

from __future__ import annotations

import io
import json
import shlex
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import (
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from spo.standins.build import (
    MANIFEST,
    StandIns,
    build_standins,
    profile_overrides,
    read_standins,
)
from spo.standins.models import SD15_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG
from spo.standins.pickapic_mirror import PICKAPIC_MIRROR_COLUMNS, build_pickapic_mirror

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPT = "a red fox in the snow, oil painting"


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> StandIns:
    start = time.perf_counter()
    built = build_standins(tmp_path_factory.mktemp("standins"))
    assert time.perf_counter() - start < 20, "stand-ins must build in CPU seconds"
    return built


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------
# layout and manifest


def test_build_writes_every_part_small_and_a_manifest(standins):
    root = standins.sd15.parent
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["pickapic", "pickscore", "scorers", "sd15", "sdxl", "sdxl_vae_fp16_fix", MANIFEST, "taesd"]
    for part in (standins.sd15, standins.sdxl, standins.sdxl_vae, standins.pickscore, standins.pickapic,
                 standins.scorers, standins.taesd):
        assert _tree_bytes(part) < 10 * 2**20, part
    assert not list(root.glob(".*.tmp-*")), "no temporary dirs left behind"
    assert read_standins(root) == standins
    assert standins.profiles() == ("sd15", "sdxl")


def test_one_profile_builds_only_its_parts(tmp_path):
    built = build_standins(tmp_path, ("sd15",))
    assert built.sdxl is None and built.sdxl_vae is None and built.profiles() == ("sd15",)
    with pytest.raises(ValueError, match="sdxl"):
        profile_overrides(built, "sdxl")
    with pytest.raises(ValueError, match="expected some of"):
        build_standins(tmp_path, ("sd3",))


# ----------------------------------------------------------------------------------------------------
# SD1.5


def test_sd15_has_the_real_structure(standins):
    index = json.loads((standins.sd15 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    unet = UNet2DConditionModel.from_pretrained(standins.sd15, subfolder="unet")
    assert tuple(unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(unet.config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.addition_embed_type is None
    text_encoder = CLIPTextModel.from_pretrained(standins.sd15, subfolder="text_encoder")
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert text_encoder.config.max_position_embeddings == 77
    vae = AutoencoderKL.from_pretrained(standins.sd15, subfolder="vae")
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == 0.18215
    scheduler_file = json.loads((standins.sd15 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_file == SD15_SCHEDULER_CONFIG
    assert scheduler_file["beta_start"] == 0.00085 and scheduler_file["beta_end"] == 0.012
    assert isinstance(PNDMScheduler.from_pretrained(standins.sd15, subfolder="scheduler"), PNDMScheduler)


def test_our_ddim_loader_reads_the_published_scheduler_configs(standins):
    reference = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for pipeline in (standins.sd15, standins.sdxl):
        ddim = DDIMScheduler.from_pretrained(pipeline, subfolder="scheduler")
        assert torch.equal(ddim.betas, reference.betas)
        assert ddim.config.steps_offset == 1 and ddim.config.set_alpha_to_one is False
        assert ddim.config.clip_sample is False and ddim.config.prediction_type == "epsilon"


def test_sd15_pipeline_runs_and_tokenizer_is_clip_shaped(standins):
    pipe = StableDiffusionPipeline.from_pretrained(standins.sd15)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer.tokenize("red fox")[-1] == "fox</w>", "prompt words are single tokens"
    images = pipe(PROMPT, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_sd15_loads_through_the_project_loader(standins):
    from spo.models.diffusion_model import load_diffusion_model

    model = load_diffusion_model(str(standins.sd15))
    latents = model.encode_images(torch.zeros(2, 3, 64, 64))
    assert latents.shape == (2, 4, 8, 8)
    assert model.encode_prompts([PROMPT, ""]).hidden_states.shape == (2, 77, model.unet.config.cross_attention_dim)


# ----------------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_has_the_real_structure(standins):
    index = json.loads((standins.sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = UNet2DConditionModel.from_pretrained(standins.sdxl, subfolder="unet")
    config = unet.config
    assert tuple(config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(config.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert config.addition_embed_type == "text_time" and config.use_linear_projection is True
    assert len(config.transformer_layers_per_block) == 3
    text_1 = CLIPTextModel.from_pretrained(standins.sdxl, subfolder="text_encoder")
    text_2 = CLIPTextModelWithProjection.from_pretrained(standins.sdxl, subfolder="text_encoder_2")
    assert config.cross_attention_dim == text_1.config.hidden_size + text_2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == \
        6 * config.addition_time_embed_dim + text_2.config.projection_dim
    vae = AutoencoderKL.from_pretrained(standins.sdxl, subfolder="vae")
    assert vae.config.scaling_factor == 0.13025 and vae.config.force_upcast is True
    assert len(vae.config.block_out_channels) == 4
    scheduler_file = json.loads((standins.sdxl / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_file == SDXL_SCHEDULER_CONFIG
    assert scheduler_file["timestep_spacing"] == "leading" and scheduler_file["use_karras_sigmas"] is False
    assert isinstance(EulerDiscreteScheduler.from_pretrained(standins.sdxl, subfolder="scheduler"),
                      EulerDiscreteScheduler)


def test_sdxl_unet_takes_text_time_conditioning(standins):
    unet = UNet2DConditionModel.from_pretrained(standins.sdxl, subfolder="unet")
    text_2 = CLIPTextModelWithProjection.from_pretrained(standins.sdxl, subfolder="text_encoder_2")
    batch = 2
    hidden = torch.randn(batch, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(batch, text_2.config.projection_dim),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    with torch.no_grad():
        out = unet(torch.randn(batch, 4, 8, 8), torch.tensor([951, 1]), hidden, added_cond_kwargs=added).sample
    assert out.shape == (batch, 4, 8, 8)
    with pytest.raises(ValueError, match="text_embeds"):
        unet(torch.randn(batch, 4, 8, 8), torch.tensor([951, 1]), hidden, added_cond_kwargs={})


def test_sdxl_pipeline_runs_with_the_fp16_fix_vae(standins):
    vae = AutoencoderKL.from_pretrained(standins.sdxl_vae)
    assert vae.config.force_upcast is False and vae.config.scaling_factor == 0.13025
    pipe = StableDiffusionXLPipeline.from_pretrained(standins.sdxl, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.model_max_length == 77
    images = pipe(PROMPT, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


# ----------------------------------------------------------------------------------------------------
# PickScore


def test_taesd_is_an_autoencoder_tiny_that_reads_both_models_latents(standins):
    from diffusers import AutoencoderTiny

    from spo.models.diffusion_model import load_diffusion_model
    from spo.models.scoring_decoder import load_scoring_decoder

    config = json.loads((standins.taesd / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["scaling_factor"] == 1.0  # reads scaled latents
    assert config["num_decoder_blocks"] == [3, 3, 3, 1] and config["latent_channels"] == 4  # TAESD's layout
    for base in (standins.sd15, standins.sdxl):
        model = load_diffusion_model(str(base))
        decoder = load_scoring_decoder(str(standins.taesd), model.vae)
        assert isinstance(decoder, AutoencoderTiny)
        latents = torch.randn(1, 4, 8, 8)
        assert decoder.decode(latents).sample.shape == model.vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_pickscore_is_a_clip_with_laions_processor(standins):
    model = CLIPModel.from_pretrained(standins.pickscore)
    processor = CLIPProcessor.from_pretrained(standins.pickscore)
    vision = model.config.vision_config
    assert vision.image_size == 224 and model.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)
    image_processor = processor.image_processor
    assert image_processor.size["shortest_edge"] == 224
    assert (image_processor.crop_size["height"], image_processor.crop_size["width"]) == (224, 224)
    assert image_processor.resample == 3
    assert list(image_processor.image_mean) == CLIP_MEAN and list(image_processor.image_std) == CLIP_STD
    assert processor.tokenizer.model_max_length == 77
    images = [Image.new("RGB", (96, 64), "orange"), Image.new("RGB", (64, 64), "navy")]
    inputs = processor(text=[PROMPT], images=images, return_tensors="pt", padding="max_length", truncation=True)
    assert inputs.pixel_values.shape == (2, 3, 224, 224)
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_pickscore_backs_the_step_aware_preference_model(standins):
    from spo.models.step_aware_preference_model import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_backbone(str(standins.pickscore), str(standins.pickscore))
    assert spm.image_transform.mean == tuple(CLIP_MEAN)


# ----------------------------------------------------------------------------------------------------
# Pick-a-Pic mirror


def _shards(mirror: Path) -> dict[str, list[Path]]:
    files = sorted((mirror / "data").glob("*.parquet"))
    return {split: [f for f in files if f.name.startswith(f"{split}-")] for split in ("train", "validation_unique")}


def test_mirror_has_the_hub_layout_and_every_column(standins):
    shards = _shards(standins.pickapic)
    assert len(shards["train"]) == 3 and len(shards["validation_unique"]) == 1
    assert [f.name[:20] for f in shards["train"]] == [f"train-{i:05d}-of-00003" for i in range(3)]
    assert shards["validation_unique"][0].name.startswith("validation_unique-00000-of-00001-")
    for path in shards["train"] + shards["validation_unique"]:
        schema = pq.read_schema(path)
        assert schema.names == PICKAPIC_MIRROR_COLUMNS.names
        assert schema.field("created_at").type == pa.timestamp("ns")
        assert schema.field("jpg_0").type == pa.binary() and schema.field("label_0").type == pa.float64()
        for name in ("ranking_id", "user_id", "num_example_per_prompt", "__index_level_0__"):
            assert schema.field(name).type == pa.int64()
        for name in ("are_different", "has_label"):
            assert schema.field(name).type == pa.bool_()
        for name in ("best_image_uid", "caption", "image_0_uid", "image_0_url", "image_1_uid", "model_0"):
            assert schema.field(name).type == pa.string()


def test_mirror_rows_look_like_pickapic(standins):
    shards = _shards(standins.pickapic)
    train = pa.concat_tables([pq.read_table(f) for f in shards["train"]])
    validation = pq.read_table(shards["validation_unique"][0])
    everything = pa.concat_tables([train, validation])
    ids = everything["ranking_id"].to_pylist()
    assert len(set(ids)) == len(ids), "ranking ids are unique across the mirror"
    labels = set(zip(everything["label_0"].to_pylist(), everything["label_1"].to_pylist()))
    assert labels == {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    assert not all(train["has_label"].to_pylist()) and not all(train["are_different"].to_pylist())
    assert all(validation["has_label"].to_pylist())
    counts = train["num_example_per_prompt"].to_pylist()
    assert set(counts) <= {1, 2, 3} and max(counts) > 1
    for caption, count in zip(train["caption"].to_pylist(), counts):
        assert train["caption"].to_pylist().count(caption) == count
    assert len(set(validation["caption"].to_pylist())) == validation.num_rows
    sizes = set()
    for column in ("jpg_0", "jpg_1"):
        for data in everything[column].to_pylist():
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG"
            image.load()
            sizes.add(image.size)
    assert all(48 <= side <= 96 for size in sizes for side in size)
    assert any(w != h for w, h in sizes) and len(sizes) > 5
    decided = pc.not_equal(everything["label_0"], 0.5)
    winners = pc.if_else(pc.equal(everything["label_0"], 1.0), everything["image_0_uid"], everything["image_1_uid"])
    assert pc.all(pc.equal(pc.filter(everything["best_image_uid"], decided), pc.filter(winners, decided))).as_py()


def test_mirror_is_byte_deterministic(tmp_path):
    first = build_pickapic_mirror(tmp_path / "a", seed=3)
    second = build_pickapic_mirror(tmp_path / "b", seed=3)
    names = sorted(p.name for p in (first / "data").iterdir())
    assert names == sorted(p.name for p in (second / "data").iterdir())
    assert all((first / "data" / n).read_bytes() == (second / "data" / n).read_bytes() for n in names)
    other = build_pickapic_mirror(tmp_path / "c", seed=4)
    assert sorted(p.name for p in (other / "data").iterdir()) != names


def test_mirror_reads_through_the_prepare_source(standins):
    from spo.data.pickapic_source import mirror_files

    found = mirror_files(standins.pickapic)
    assert [len(found["train"]), len(found["validation_unique"])] == [3, 1]


# ----------------------------------------------------------------------------------------------------
# overrides and the CLI


@pytest.mark.parametrize("profile", ["sd15", "sdxl"])
def test_overrides_make_the_real_profile_point_at_the_standins(standins, profile, tmp_path):
    """Both readers of `-S key=value` agree: DVC's (Hydra grammar, into params.yaml) and spo.config's (YAML)."""
    from dvc.utils.hydra import apply_overrides

    from spo.config import load_config, load_profile

    overrides = profile_overrides(standins, profile)
    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "profiles" / f"{profile}.yaml", params)
    apply_overrides(params, overrides)
    via_dvc = load_config(params, require_implemented=False)
    via_spo = load_profile(profile, overrides, require_implemented=False)
    assert via_dvc == via_spo
    expected_model = standins.sd15 if profile == "sd15" else standins.sdxl
    assert via_dvc.model.base_model == str(expected_model)
    assert via_dvc.model.vae == (None if profile == "sd15" else str(standins.sdxl_vae))
    assert via_dvc.model.preference_backbone == via_dvc.model.preference_processor == str(standins.pickscore)
    assert via_dvc.prepare.data_dir == str(standins.pickapic)
    assert (via_dvc.model.resolution, via_dvc.model.dtype, via_dvc.torch_threads) == (64, "float32", 1)
    assert (via_dvc.train_spm.max_steps, via_dvc.train_spm.mixed_precision) == (4, "fp32")
    assert yaml.safe_load(params.read_text())["prepare"]["rows_per_shard"] == 10


def test_fixtures_cli_builds_and_prints_the_commands(tmp_path, capsys):
    from spo.cli import main
    from spo.config import load_config, load_profile

    assert main(["fixtures", "build", str(tmp_path / "fx"), "--profile", "sd15"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "fx" / MANIFEST).read_text())
    assert manifest["profiles"] == ["sd15"] and set(manifest["parts"]) == {"sd15", "pickscore", "pickapic", "scorers",
                                                                         "taesd"}
    command = next(line for line in out.splitlines() if line.startswith("spo profile use sd15 -S "))
    assert command.endswith(" && dvc repro") and "sdxl" not in out
    # the printed `spo profile use ... -S ...` writes a params.yaml that is the profile with the overrides
    params = tmp_path / "params.yaml"
    args = shlex.split(command.removesuffix(" && dvc repro"))[1:]
    assert main([*args, "--params", str(params)]) == 0
    overrides = [a for prev, a in zip(args, args[1:]) if prev == "-S"]
    assert load_config(params) == load_profile("sd15", overrides)
    assert "# was: stable-diffusion-v1-5/stable-diffusion-v1-5" in params.read_text()  # the profile's line, shown
    assert f"-S 'model.base_model=\"{tmp_path / 'fx' / 'sd15'}\"'" in out
    assert "-S train_spm.max_steps=4" in out and "-S model.vae=null" in out
    assert f"add: -S 'train_spo.scoring_decoder=\"{tmp_path / 'fx' / 'taesd'}\"'" in out
