"""Prompt sets in the SPO format: a JSON list of {"caption", "trainset_idx"} (train and eval prompts)."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """Captions from a prompt file in the SPO format: a JSON list of {"caption", "trainset_idx"}."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "caption" in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of objects with a 'caption' key")
    captions = [str(r["caption"]) for r in rows]
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ValueError(f"{path}: empty caption at rows {empty[:5]}")
    return captions[:limit] if limit else captions
