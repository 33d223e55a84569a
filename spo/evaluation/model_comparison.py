"""Paired comparison of models on one (prompt, seed) list: generate what is missing, score, tabulate.

Every model samples the same samples with deterministic DDIM and per-sample seeds, so an image depends
only on (model, prompt, seed) -- not on its batch-mates, the batch size or a restart -- and every
comparison is paired.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from spo.diffusion.cpu_workers import iter_sample_jobs, sampling_workers
from spo.evaluation.evaluated_models import ResolvedModel
from spo.evaluation.image_store import ImageStore, Sample, to_pil
from spo.evaluation.scorers import Scorer
from spo.tracking.progress import progress

TABLE_COLUMNS = ("model", "prompt_index", "prompt", "seed")


def model_store(images_dir, model: ResolvedModel) -> ImageStore:
    return ImageStore(images_dir, f"{model.name}-{model.fingerprint}")


def generate_missing(models: Sequence[ResolvedModel], samples: Sequence[Sample], images_dir, *,
                     batch_size: int, workers: int) -> dict[str, int]:
    """Sample every (model, sample) image not yet on disk, writing each batch as it is done; returns how
    many images each model had to make (0 after a complete earlier run). `workers`: at most that many CPU
    worker processes (0: this process, e.g. on a GPU)."""
    jobs, targets = [], []
    made: dict[str, int] = {}
    for model in models:
        store = model_store(images_dir, model)
        todo = store.missing(samples)
        made[model.name] = len(todo)
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            jobs.append((model.spec, ([s.prompt for s in batch], [s.seed for s in batch])))
            targets.append((store, batch))
    total = sum(made.values())
    workers = min(workers, sampling_workers(total))  # few images: this process (the same images)
    desc = f"evaluate: sampling {', '.join(m.name for m in models)}"
    with progress(total=total, desc=desc, unit="img") as bar:
        for (store, batch), images in zip(targets, iter_sample_jobs(jobs, workers)):
            store.save(batch, to_pil(images))
            bar.update(len(batch))
    return made


@torch.no_grad()
def score_models(models: Sequence[ResolvedModel], samples: Sequence[Sample], images_dir,
                 scorers: Sequence[Scorer], *, batch_size: int) -> pd.DataFrame:
    """The per-sample score table: one row per (model, sample), one column per scorer."""
    prompts = [s.prompt for s in samples]
    frames = []
    batches = -(-len(samples) // batch_size)
    with progress(total=len(models) * batches, desc=f"evaluate: scoring ({len(scorers)} scorers)",
                  unit="batch") as bar:
        for model in models:
            store = model_store(images_dir, model)
            frame = pd.DataFrame({"model": model.name, "prompt_index": [s.prompt_index for s in samples],
                                  "prompt": prompts, "seed": [s.seed for s in samples]})
            columns: dict[str, list[float]] = {scorer.name: [] for scorer in scorers}
            for i in range(0, len(samples), batch_size):  # images are read in batches: 500 SDXL PNGs are ~2 GB
                images = store.load(samples[i:i + batch_size])
                for scorer in scorers:
                    columns[scorer.name].extend(scorer.score(prompts[i:i + batch_size], images).tolist())
                bar.update(1)
            for scorer in scorers:
                frame[scorer.name] = columns[scorer.name]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)
