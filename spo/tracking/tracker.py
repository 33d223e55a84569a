"""What stages log through. Stage `run()` functions take a Tracker, so they never know about MLflow.

`MemoryTracker` keeps everything in memory (tests, library use); `spo.tracking.mlflow_tracker` implements the
same interface on MLflow with one parent run per pipeline run and a nested run per stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from PIL import Image


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics for the whole pipeline run (MLflow: the parent run), so the runs table shows the
        headline numbers of two pipeline runs side by side without opening nested runs."""
        ...

    def log_image(self, image: Image.Image, artifact_file: str) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def child(self, name: str) -> AbstractContextManager[Tracker]:
        """A tracker for one part of a stage (MLflow: a nested run), e.g. each model an eval compares."""
        ...


class MemoryTracker:
    """A Tracker that records calls; `metrics[name]` is a list of (step, value)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.images: dict[str, Image.Image] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.children: dict[str, MemoryTracker] = {}
        self.pipeline_metrics: dict[str, float] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append((step, float(value)))

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        self.pipeline_metrics.update({k: float(v) for k, v in metrics.items()})

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self.images[artifact_file] = image

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(local_path), artifact_path))

    @contextmanager
    def child(self, name: str) -> Iterator[MemoryTracker]:
        yield self.children.setdefault(name, MemoryTracker())

    def last(self, name: str) -> float:
        return self.metrics[name][-1][1]
