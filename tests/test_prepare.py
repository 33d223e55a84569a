"""The `prepare` stage on the digits world: a tiny but complete run through the real code paths."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from spo.config import PROFILES_DIR, load_profile
from spo.data import prepared_layout as inputs
from spo.data.pickapic import PICKAPIC_SCHEMA, decode_column, read_pairs
from spo.diffusion.sampling import sample_images
from spo.digits.captions import eval_captions, train_captions
from spo.digits.pairs import SamplingSettings, generate_pairs
from spo.digits.preference_oracle import PreferenceOracle
from spo.models.diffusion_model import load_diffusion_model
from spo.stages import prepare
from spo.tracking.tracker import MemoryTracker

DIGITS_PAIRS = f"{inputs.PAIRS_DIR}/{inputs.shard_name(inputs.TRAIN_SPLIT, 0)}"
TINY = ["prepare.vae_train_steps=3", "prepare.unet_train_steps=3", "prepare.backbone_train_steps=3",
        "prepare.train_batch_size=8", "prepare.num_pairs=12"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As `prepare.run` does on a busy-waiting OpenMP: one thread (tiny ops gain nothing from two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = load_profile("digits", overrides=TINY)
    out_dir = tmp_path_factory.mktemp("prepare") / "prepared"
    tracker = MemoryTracker()
    metrics = prepare.run(cfg, out_dir=out_dir, tracker=tracker)
    return cfg, out_dir, metrics, tracker


@pytest.mark.slow
def test_prepare_writes_every_output_and_its_metrics(prepared):
    _, out, metrics, _ = prepared
    for name in (inputs.BASE_MODEL_DIR, inputs.BACKBONE_DIR, inputs.ORACLE_DIR):
        assert (out / name).is_dir(), name
    for name in (DIGITS_PAIRS, inputs.TRAIN_PROMPTS_FILE, inputs.EVAL_PROMPTS_FILE, prepare.METRICS_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / prepare.METRICS_FILE).read_text()) == pytest.approx(metrics)
    for key in ("vae_mse", "base_alignment_accuracy", "base_aesthetic_mean", "real_aesthetic_mean",
                "oracle_classifier_holdout_accuracy", "pairs_tie_fraction", "pairs_image0_win_fraction",
                "backbone_zero_shot_accuracy"):
        assert math.isfinite(metrics[key]), key
    assert metrics["oracle_classifier_holdout_accuracy"] > 0.9  # the oracle does not depend on the tiny knobs
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no staging leftovers


@pytest.mark.slow
def test_base_model_loads_with_the_project_loader_and_with_diffusers(prepared):
    from diffusers import StableDiffusionPipeline

    cfg, out, _, _ = prepared
    model = load_diffusion_model(str(out / inputs.BASE_MODEL_DIR))
    assert model.scheduler.config.steps_offset == 1 and model.tokenizer.model_max_length == 16
    images = sample_images(model, ["the digit one", "a handwritten digit two"], [0, 1], resolution=16,
                           num_inference_steps=3)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    pipe = StableDiffusionPipeline.from_pretrained(out / inputs.BASE_MODEL_DIR)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 2
    result = pipe("the digit one", height=16, width=16, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_backbone_and_oracle_load_from_their_directories(prepared):
    from transformers import CLIPModel, CLIPProcessor

    cfg, out, _, _ = prepared
    model = CLIPModel.from_pretrained(out / inputs.BACKBONE_DIR)
    processor = CLIPProcessor.from_pretrained(out / inputs.BACKBONE_DIR)
    assert model.config.vision_config.image_size == 16 and model.config.projection_dim == 32
    assert processor.image_processor.crop_size == {"height": 16, "width": 16}
    oracle = PreferenceOracle.load(out / inputs.ORACLE_DIR)
    assert oracle.config == cfg.prepare.oracle


@pytest.mark.slow
def test_pairs_parquet_has_the_pickapic_schema_and_valid_labels(prepared):
    cfg, out, metrics, _ = prepared
    path = out / DIGITS_PAIRS
    assert inputs.split_shards(out / inputs.PAIRS_DIR, inputs.TRAIN_SPLIT) == [path]  # one shard, no eval split
    assert pq.read_schema(path).remove_metadata() == PICKAPIC_SCHEMA
    frame = read_pairs(path)
    assert len(frame) == cfg.prepare.num_pairs and frame["ranking_id"].is_unique
    assert set(frame["caption"]) <= set(train_captions())
    assert set(frame["label_0"]) <= {0.0, 0.5, 1.0} and ((frame["label_0"] + frame["label_1"]) == 1.0).all()
    assert frame["label_0"].eq(0.5).mean() == pytest.approx(metrics["pairs_tie_fraction"])
    won_0 = frame["label_0"] == 1.0
    assert (frame.loc[won_0, "best_image_uid"] == frame.loc[won_0, "image_0_uid"]).all()
    assert decode_column(frame, "jpg_1", 16).shape == (len(frame), 3, 16, 16)


@pytest.mark.slow
def test_prompt_files_have_the_spo_prompt_format(prepared):
    _, out, _, _ = prepared
    train = json.loads((out / inputs.TRAIN_PROMPTS_FILE).read_text())
    evaluation = json.loads((out / inputs.EVAL_PROMPTS_FILE).read_text())
    assert [r["caption"] for r in train] == train_captions() and [r["caption"] for r in evaluation] == eval_captions()
    assert all(set(r) == {"caption", "trainset_idx"} for r in train + evaluation)
    assert len({r["trainset_idx"] for r in train + evaluation}) == len(train) + len(evaluation)


@pytest.mark.slow
def test_tracker_receives_the_params_and_metrics(prepared):
    cfg, _, metrics, tracker = prepared
    assert tracker.params["prepare.num_pairs"] == cfg.prepare.num_pairs and tracker.params["seed"] == cfg.seed
    assert tracker.last("base_alignment_accuracy") == pytest.approx(metrics["base_alignment_accuracy"])
    assert tracker.last("time_total_s") > 0
    assert "prepare/base_samples_eval_captions.png" in tracker.images


@pytest.mark.slow
def test_pair_generation_is_reproducible_for_a_seed(prepared):
    cfg, out, _, _ = prepared
    model_dir = out / inputs.BASE_MODEL_DIR
    oracle = PreferenceOracle.load(out / inputs.ORACLE_DIR)
    prompts = train_captions()[:3]
    small = SamplingSettings(batch_pairs=2)  # 2 batches, so 2 workers really split the work
    # this process (on one thread, as a worker) vs 2 worker processes: no third interpreter start-up
    torch.set_num_threads(1)
    first, _ = generate_pairs(model_dir, oracle, prompts, num_pairs=4, resolution=16, seed=5, settings=small,
                              workers=0)
    again, _ = generate_pairs(model_dir, oracle, prompts, num_pairs=4, resolution=16, seed=5, settings=small,
                              workers=2)
    other, _ = generate_pairs(model_dir, oracle, prompts, num_pairs=4, resolution=16, seed=6, settings=small,
                              workers=0)
    assert first.equals(again)  # the same bytes whatever the number of worker processes
    assert (first["jpg_0"] != other["jpg_0"]).all()


def test_a_failed_run_keeps_the_previous_output(tmp_path, monkeypatch):
    out_dir = tmp_path / "prepared"
    out_dir.mkdir()
    (out_dir / "marker").write_text("previous run")

    def fail_midway(cfg, staging, tracker, timer):
        (staging / "metrics.json").write_text("half a result")
        raise RuntimeError("boom")

    monkeypatch.setattr(prepare, "build_digits_world", fail_midway)
    with pytest.raises(RuntimeError, match="boom"):
        prepare.run(load_profile("digits"), out_dir=out_dir, tracker=MemoryTracker())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.lock", "prepared"]  # the lock file stays
    assert [p.name for p in out_dir.iterdir()] == ["marker"]


def test_cli_parses_params_and_overrides(tmp_path, mlflow_db):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["-S", "prepare.no_such_knob=1", "--params", str(PROFILES_DIR / "digits.yaml"),
                      "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
