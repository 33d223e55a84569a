"""Resumable training: a checkpoint every N optimizer steps, and resume from the latest one.

A checkpoint is `DIR/step-000100.pt`: everything the loop needs to continue exactly as if it had never
stopped (model, optimizer and LR-schedule state, the step, the loss history, the metrics measured
before training). The data order and every noise draw are planned from the seed up front
(`spm_inputs.plan_training_jobs`), so no RNG state is needed: step s after a resume sees the same batch,
t and noise as step s of an uninterrupted run.

A checkpoint is only resumed by the run that wrote it: its `fingerprint` (a hash of everything that
shapes training: the config sections, the data, the start weights) must match, otherwise the stage
starts over and says why. Files are written atomically; the last `keep` are kept. The directory is
not a DVC output (DVC deletes outputs before a stage runs), so a killed `dvc repro` or a retried KFP
task finds it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spo.atomic_write import atomic_file

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (config dicts, data digests, locations)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where, how often and for which run (fingerprint) to checkpoint; every <= 0 disables saving."""

    directory: Path
    every: int
    fingerprint: str
    keep: int = 2
    unit: str = "step"  # what the counter counts (SPO checkpoints every N rounds): the files' prefix

    def path(self, step: int) -> Path:
        return self.directory / f"{self.unit}-{step:06d}.pt"

    def due(self, step: int, last_step: int) -> bool:
        """Save after `step` (1-based) when it is a multiple of `every`, but not at the very end: the stage
        writes its real output then, and a finished run needs no resume."""
        return self.every > 0 and step % self.every == 0 and step < last_step

    def steps_on_disk(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        name = re.compile(rf"^{re.escape(self.unit)}-(\d{{6,}})\.pt$")
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := name.match(p.name)))

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write step `step`'s state atomically, then drop all but the newest `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        with atomic_file(path) as tmp:
            torch.save({"fingerprint": self.fingerprint, "step": step, **state}, tmp)
        for old in self.steps_on_disk()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        log.info("checkpoint: %s", path)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint of this run (matching fingerprint), or None. A checkpoint of another run
        is left alone and named in the log (so the user knows why the stage starts over)."""
        for step in reversed(self.steps_on_disk()):
            path = self.path(step)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)  # our own files: tensors, numbers, lists
            except Exception as err:  # a truncated file cannot exist (atomic writes), but a foreign one can
                log.warning("checkpoint %s is unreadable (%s): ignored", path, err)
                continue
            if state.get("fingerprint") != self.fingerprint:
                log.warning("checkpoint %s belongs to another run (config, data or start weights differ): "
                            "starting from step 0", path)
                return None
            log.info("resuming from %s (step %d)", path, step)
            return state
        return None

    def clear(self) -> None:
        """Remove this policy's checkpoints (after the stage wrote its final output)."""
        for step in self.steps_on_disk():
            self.path(step).unlink(missing_ok=True)
