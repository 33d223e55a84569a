"""The `prepare` stage's output directory (data/prepared in dvc.yaml), the same for every profile:

    pairs/train-00000.parquet ...              Pick-a-Pic-format pairs, in shards (PICKAPIC_SCHEMA)
    pairs/validation_unique-00000.parquet      held-out pairs with labels (Pick-a-Pic's validation_unique);
                                               absent for digits, whose SPM holds out train pairs instead
    prompts/train.json, prompts/eval.json      SPO prompt files ({caption, trainset_idx})
    models/                                    digits: base_model/, preference_backbone/, oracle/ (built);
                                               real profiles: models.json (where each model comes from)
    metrics.json                               counts (DVC metrics)

(Where a stage finds its models, from the config: spo.data.model_locations.)
"""

from __future__ import annotations

from pathlib import Path

PAIRS_DIR = "pairs"
TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation_unique"
MODELS_DIR = "models"
BASE_MODEL_DIR = "models/base_model"
BACKBONE_DIR = "models/preference_backbone"
ORACLE_DIR = "models/oracle"
MODELS_MANIFEST = "models/models.json"
TRAIN_PROMPTS_FILE = "prompts/train.json"
EVAL_PROMPTS_FILE = "prompts/eval.json"
METRICS_FILE = "metrics.json"


def shard_name(split: str, index: int) -> str:
    """`train-00003.parquet`: shards sort by split, then number."""
    return f"{split}-{index:05d}.parquet"


def split_shards(pairs_dir: Path, split: str) -> list[Path]:
    """The shards of one split in `pairs_dir`, in order (empty if none)."""
    return sorted(Path(pairs_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))
