"""MLflow implementation of Tracker (placeholder: to be completed with parent/nested runs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from spo.config import Config
from spo.tracking import MemoryTracker, Tracker


@contextmanager
def stage_tracker(stage: str, cfg: Config) -> Iterator[Tracker]:
    yield MemoryTracker()
