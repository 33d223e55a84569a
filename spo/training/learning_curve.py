"""Score vs training wall time, measured the same way for SPO and DPO ("converges faster", measured).

Before training and at `learning_curve.points` evenly spaced moments (rounds for SPO, optimizer steps
for DPO), the model in training samples a fixed set of eval prompts (DDIM with η = 0: each image depends only on its prompt and seed, and no global RNG is drawn, so a run with
a curve trains exactly as one without) and the `learning_curve.scorers` rate the 8-bit images, as
`evaluate` does. The seconds spent here are not counted as training time.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spo.config import Config
from spo.data.prepared_layout import EVAL_PROMPTS_FILE
from spo.data.prompts import read_prompts
from spo.diffusion.sampling import sample_images
from spo.evaluation.image_store import to_pil
from spo.models.diffusion_model import DiffusionModel
from spo.tracking.tracker import Tracker

CURVE_FILE = "curve.csv"
FIXED_FIELDS = ("point", "position", "step", "train_seconds", "pairs_seen", "score")
# `score` repeats the first scorer's mean under a fixed name, so one DVC plot serves every profile

Measure = Callable[[DiffusionModel], dict[str, float]]


def curve_positions(points: int, total: int) -> list[int]:
    """0 and `points` evenly spaced positions up to `total` (rounded, distinct)."""
    if points <= 0 or total <= 0:
        return []
    return sorted({round(k * total / points) for k in range(points + 1)})


@dataclass
class LearningCurve:
    """Measures at the planned positions; rows survive a resume (they go into the checkpoint)."""

    measure: Measure | None
    positions: list[int]
    metric_names: list[str]
    tracker: Tracker | None = None
    rows: list[dict[str, float]] = field(default_factory=list)
    seconds_spent: float = 0.0

    def due(self, position: int) -> bool:
        return self.measure is not None and position in self.positions and \
            all(r["position"] != position for r in self.rows)

    def maybe_measure(self, model: DiffusionModel, position: int, *, step: int, train_seconds: float,
                      pairs_seen: int, is_main: bool = True) -> None:
        if not self.due(position) or not is_main:
            return
        start = time.perf_counter()
        training = model.unet.training
        model.unet.eval()
        scores = self.measure(model)
        model.unet.train(training)
        row = {"point": float(len(self.rows)), "position": float(position), "step": float(step),
               "train_seconds": train_seconds, "pairs_seen": float(pairs_seen),
               "score": scores[self.metric_names[0]], **scores}
        self.rows.append(row)
        if self.tracker is not None:
            self.tracker.log_metrics({f"curve.{k}": v for k, v in row.items() if k not in ("point", "position")},
                                     step=step)
        self.seconds_spent += time.perf_counter() - start

    def write(self, path: Path) -> None:
        with Path(path).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*FIXED_FIELDS, *self.metric_names])
            writer.writeheader()
            writer.writerows(self.rows)


def sampling_measure(cfg: Config, prompts: Sequence[str], scorers: Sequence, names: Sequence[str]) -> Measure:
    lc = cfg.learning_curve

    @torch.no_grad()
    def measure(model: DiffusionModel) -> dict[str, float]:
        images = []
        for start in range(0, len(prompts), lc.batch_size):
            batch = list(prompts[start:start + lc.batch_size])
            images += to_pil(sample_images(model, batch, [lc.seed] * len(batch), resolution=cfg.model.resolution,
                                           num_inference_steps=lc.num_inference_steps,
                                           guidance_scale=lc.guidance_scale, eta=0.0))
        return {name: float(scorer.score(list(prompts), images).double().mean())
                for name, scorer in zip(names, scorers)}
    return measure


def learning_curve(cfg: Config, *, prepared_dir: Path, total: int, device: str | torch.device,
                   tracker: Tracker | None, is_main: bool = True) -> LearningCurve:
    """The curve `cfg.learning_curve` asks for over `total` positions (no scorers are loaded for 0 points
    or on other processes than the main one)."""
    lc = cfg.learning_curve
    names = [s.name for s in lc.scorers]
    positions = curve_positions(lc.points, total)
    if not positions or not is_main:
        return LearningCurve(None, positions, names, tracker)
    from spo.evaluation.scorer_set import build_scorers

    prompts = read_prompts(Path(prepared_dir) / EVAL_PROMPTS_FILE, lc.num_prompts)
    scorers = build_scorers(lc.scorers, prepared_dir=Path(prepared_dir), spm_dir=None, device=str(device),
                            batch_size=lc.batch_size)
    return LearningCurve(sampling_measure(cfg, prompts, scorers, names), positions, names, tracker)
