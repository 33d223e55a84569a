"""Where a stage finds its models: the hub id of a real profile, or what `prepare` built for digits."""

from __future__ import annotations

from pathlib import Path

from spo.config import Config

# Layout of the `prepare` stage's output directory (data/prepared in dvc.yaml).
BASE_MODEL_DIR = "base_model"
BACKBONE_DIR = "preference_backbone"
ORACLE_DIR = "oracle"
PAIRS_FILE = "pairs.parquet"
TRAIN_PROMPTS_FILE = "prompts/train.json"
EVAL_PROMPTS_FILE = "prompts/eval.json"


def base_model_location(cfg: Config, prepared_dir: Path) -> str:
    return cfg.model.base_model or str(prepared_dir / BASE_MODEL_DIR)


def preference_backbone_location(cfg: Config, prepared_dir: Path) -> str:
    return cfg.model.preference_backbone or str(prepared_dir / BACKBONE_DIR)
