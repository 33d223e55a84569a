"""Where a stage finds its models: the hub id (or local dir) a real profile names, or what `prepare` built
for digits (spo.data.prepared_layout). Apart from the layout, so a stage that only needs the layout
(validate) does not read the `model` config section."""

from __future__ import annotations

from pathlib import Path

from spo.config import Config
from spo.data.prepared_layout import BACKBONE_DIR, BASE_MODEL_DIR


def base_model_location(cfg: Config, prepared_dir: Path) -> str:
    return cfg.model.base_model or str(prepared_dir / BASE_MODEL_DIR)


def preference_backbone_location(cfg: Config, prepared_dir: Path) -> str:
    return cfg.model.preference_backbone or str(prepared_dir / BACKBONE_DIR)
