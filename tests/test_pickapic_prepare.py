"""`prepare` for real profiles: a local Pick-a-Pic mirror (hub layout, every real column) through `datasets`,
checked against independent pandas counts over the mirror's files. Offline: the hub is never asked."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from spo.config import ConfigError, MissingPathError, load_profile
from spo.data import prepared_layout as layout
from spo.data.pair_shards import PairShards
from spo.data.pickapic import PICKAPIC_SCHEMA
from spo.data.pickapic_source import (
    hub_data_files,
    mirror_files,
    resolve_source,
    select_shards,
    shard_number,
    shipped_train_prompts,
)
from spo.stages.prepare import run
from spo.standins.pickapic_mirror import build_pickapic_mirror
from spo.tracking.tracker import MemoryTracker

SHARED_PROMPTS = Path("/work/shared/data/spo_4k_training_prompts.json")
METRIC_KEYS = {"rows_read", "unlabelled", "kept", "ties", "eval_rows", "train_shards", "train_prompts",
               "eval_prompts", "seconds"}


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """Any attempt to reach the hub fails instead of hanging or downloading (module scope: it must also
    cover the module-scoped runs below)."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("SPO_PROGRESS", "0")
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def mirror(_offline, tmp_path_factory) -> Path:
    return build_pickapic_mirror(tmp_path_factory.mktemp("mirror"), train_shards=3, rows_per_shard=12,
                                 validation_rows=8, seed=0)


def mirror_frame(mirror: Path, split: str, shards: list[int] | None = None) -> pd.DataFrame:
    """The split's rows straight from the mirror files (pandas, no datasets), in shard order."""
    files = sorted((mirror / "data").glob(f"{split}-*.parquet"))
    if shards is not None:
        files = [next(f for f in files if f.name.startswith(f"{split}-{n:05d}-")) for n in shards]
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def prepare(mirror: Path, out: Path, *overrides: str) -> tuple[dict, MemoryTracker]:
    cfg = load_profile("sd15", overrides=[f"prepare.data_dir={mirror}", "prepare.rows_per_shard=10", *overrides],
                       require_implemented=False)
    tracker = MemoryTracker()
    return run(cfg, out_dir=out, tracker=tracker), tracker


def split_frame(out: Path, split: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in layout.split_shards(out / layout.PAIRS_DIR, split)],
                     ignore_index=True)


def assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got.reset_index(drop=True),
                                  expected[PICKAPIC_SCHEMA.names].reset_index(drop=True), check_dtype=False)


@pytest.fixture(scope="module")
def full_run(_offline, mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    cfg = load_profile("sd15", overrides=[f"prepare.data_dir={mirror}", "prepare.rows_per_shard=10"],
                       require_implemented=False)
    tracker = MemoryTracker()
    metrics = run(cfg, out_dir=out, tracker=tracker)
    return out, metrics, tracker, cfg


def test_full_prepare_matches_an_independent_count(full_run, mirror):
    out, metrics, tracker, _ = full_run
    train = mirror_frame(mirror, "train")
    kept = train[train.has_label]
    assert len(kept) < len(train)  # the mirror does hold unlabelled rows
    ties = int(((kept.label_0 == 0.5) & (kept.label_1 == 0.5)).sum())
    assert ties > 0
    validation = mirror_frame(mirror, "validation_unique")
    assert {k: metrics[k] for k in METRIC_KEYS - {"seconds"}} == {
        "rows_read": len(train), "unlabelled": int((~train.has_label).sum()), "kept": len(kept), "ties": ties,
        "eval_rows": int(validation.has_label.sum()), "train_shards": -(-len(kept) // 10),
        "train_prompts": 4000, "eval_prompts": validation[validation.has_label].caption.nunique()}
    assert set(metrics) == METRIC_KEYS
    assert json.loads((out / layout.METRICS_FILE).read_text()) == {k: v for k, v in metrics.items() if k != "seconds"}
    assert {k: tracker.last(k) for k in metrics} == pytest.approx(metrics)
    # the shards: every labelled row, ties and all, in source order, exactly the schema (no urls, no index)
    assert_same_rows(split_frame(out, "train"), kept)
    assert_same_rows(split_frame(out, "validation_unique"), validation[validation.has_label])
    for path in layout.split_shards(out / layout.PAIRS_DIR, "train"):
        assert pq.read_schema(path).remove_metadata() == PICKAPIC_SCHEMA
    assert [pq.read_metadata(p).num_rows for p in layout.split_shards(out / "pairs", "train")][:-1] == [10, 10, 10]
    assert len(PairShards(out / "pairs", "train")) == len(kept)


def test_prompts_and_models_manifest(full_run, mirror):
    out, _, tracker, cfg = full_run
    assert json.loads((out / layout.TRAIN_PROMPTS_FILE).read_text()) == json.loads(SHARED_PROMPTS.read_text())
    assert shipped_train_prompts().read_bytes() == SHARED_PROMPTS.read_bytes()
    validation = mirror_frame(mirror, "validation_unique")
    validation = validation[validation.has_label].reset_index(drop=True)
    first_seen = validation.drop_duplicates("caption")
    expected = [{"caption": c, "trainset_idx": int(i)} for i, c in first_seen.caption.items()]
    assert json.loads((out / layout.EVAL_PROMPTS_FILE).read_text()) == expected
    assert json.loads((out / layout.MODELS_MANIFEST).read_text()) == {
        "base_model": cfg.model.base_model, "vae": cfg.model.vae, "architecture": "sd15",
        "preference_backbone": cfg.model.preference_backbone,
        "preference_processor": cfg.model.preference_processor}
    assert tracker.params["prepare.data_dir"] == str(mirror)
    assert not any("token" in k.lower() for k in tracker.params)


def test_shard_selection_and_max_pairs(mirror, tmp_path):
    metrics, _ = prepare(mirror, tmp_path / "a", "prepare.shards=[2, 0]")
    train = mirror_frame(mirror, "train", [2, 0])
    kept = train[train.has_label]
    assert (metrics["rows_read"], metrics["kept"]) == (len(train), len(kept))
    assert_same_rows(split_frame(tmp_path / "a", "train"), kept)

    metrics, _ = prepare(mirror, tmp_path / "b", "prepare.max_pairs=15")
    train = mirror_frame(mirror, "train")
    last = train.index[train.has_label][14]  # the row giving the 15th kept pair
    used = train.iloc[:last + 1]
    assert (metrics["kept"], metrics["rows_read"]) == (15, last + 1)
    assert metrics["unlabelled"] == int((~used.has_label).sum()) > 0
    assert_same_rows(split_frame(tmp_path / "b", "train"), used[used.has_label])
    assert metrics["eval_rows"] == 8  # max_pairs limits train rows only


def test_two_runs_write_identical_bytes(full_run, mirror, tmp_path):
    first, *_ = full_run
    prepare(mirror, tmp_path / "again")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:  # metrics.json included: counts only, no run time
        assert (first / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_flat_mirror_and_given_prompt_files(full_run, mirror, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(mirror / "data", flat)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"caption": "a red cube", "trainset_idx": 0}, {"caption": "a blue ball"}]))
    metrics, _ = prepare(flat, tmp_path / "out", f"prepare.train_prompts={prompts}",
                         f"prepare.eval_prompts={prompts}")
    assert (metrics["train_prompts"], metrics["eval_prompts"]) == (2, 2)
    for name in (layout.TRAIN_PROMPTS_FILE, layout.EVAL_PROMPTS_FILE):
        assert (tmp_path / "out" / name).read_bytes() == prompts.read_bytes()
    out, *_ = full_run
    assert split_frame(tmp_path / "out", "train").equals(split_frame(out, "train"))


def test_no_validation_split(mirror, tmp_path, caplog):
    only_train = tmp_path / "only_train" / "data"
    only_train.mkdir(parents=True)
    for path in (mirror / "data").glob("train-*"):
        shutil.copy(path, only_train)
    with pytest.raises(ConfigError, match="prepare.eval_prompts"):
        prepare(only_train.parent, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"caption": "a red cube", "trainset_idx": 0}]))
    with caplog.at_level(logging.WARNING):
        metrics, _ = prepare(only_train.parent, tmp_path / "y", f"prepare.eval_prompts={prompts}")
    assert metrics["eval_rows"] == 0 and "validation_unique" in caplog.text
    assert not layout.split_shards(tmp_path / "y" / "pairs", "validation_unique")


def test_errors_name_the_key_and_path(mirror, tmp_path):
    with pytest.raises(MissingPathError, match=r"prepare\.data_dir.*nowhere"):
        prepare(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no train shards.*empty"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"prepare\.shards.*\[7\]"):
        prepare(mirror, tmp_path / "out", "prepare.shards=[0, 7]")
    with pytest.raises(MissingPathError, match=r"prepare\.train_prompts"):
        prepare(mirror, tmp_path / "out", f"prepare.train_prompts={tmp_path / 'none.json'}")
    bad_prompts = tmp_path / "bad.json"
    bad_prompts.write_text(json.dumps({"caption": "x"}))
    with pytest.raises(ConfigError, match=r"prepare\.eval_prompts"):
        prepare(mirror, tmp_path / "out", f"prepare.eval_prompts={bad_prompts}")
    broken = tmp_path / "broken"
    shutil.copytree(mirror, broken)
    shard = sorted((broken / "data").glob("train-00001-*"))[0]
    pq.write_table(pq.read_table(shard).drop_columns(["jpg_1"]), shard)
    with pytest.raises(ConfigError, match=rf"{shard.name}.*jpg_1"):
        prepare(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is visible


def test_file_and_pattern_selection_offline(mirror, tmp_path):
    files = mirror_files(mirror)
    assert sorted(files) == ["train", "validation_unique"]
    assert [shard_number(p) for p in files["train"]] == [0, 1, 2]
    assert mirror_files(tmp_path) == {}
    assert select_shards(files["train"], [2, 0, 2], mirror) == [files["train"][2], files["train"][0]]
    assert select_shards(files["train"], None, mirror) == files["train"]
    assert hub_data_files("train") == ["data/train-*.parquet"]
    assert hub_data_files("train", [3, 12]) == ["data/train-00003-of-*.parquet", "data/train-00012-of-*.parquet"]
    assert hub_data_files("validation_unique") == ["data/validation_unique-*.parquet"]
    hub = resolve_source(load_profile("sd15", ["prepare.dataset=pickapic_v2", "prepare.shards=[1]"],
                                     require_implemented=False).prepare)
    assert (hub.repo, hub.train) == ("yuvalkirstain/pickapic_v2", ("data/train-00001-of-*.parquet",))
    with pytest.raises(ValueError):
        shard_number("train.parquet")
