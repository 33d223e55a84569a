"""The SPM's inputs: which pairs, at which t, with which noise, and their decoded one-step x̂0.

The x̂0 of a pair depends on the frozen base model, the pair, t and the noise only, never on the SPM, so
every batch is planned up front as an `X0Job` (row indices, timesteps, a noise seed). In-process
(GPU) a job is computed when asked for; on a CPU a worker process computes all jobs, in order, on the
other core while this process trains (the preference phase first, then the SPM on jobs already done).
Either way job i gives the same x̂0, so the result does not depend on where it was computed.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from spo.data.pair_shards import PairShards
from spo.data.pickapic import decode_column
from spo.data.prepared_layout import EVAL_SPLIT, TRAIN_SPLIT, split_shards
from spo.data.quarantine import quarantined_rows
from spo.models.diffusion_model import DiffusionModel, load_diffusion_model
from spo.training.spm_training import (
    PairBatch,
    PairLoader,
    batch_indices,
    noisy_x0_images,
    sample_timesteps,
)


@dataclass(frozen=True)
class X0Job:
    """One batch of SPM inputs: rows of the pairs table, one t per row, the seed of all its noise."""

    indices: tuple[int, ...]
    timesteps: tuple[int, ...]
    seed: int


X0Source = Callable[[X0Job], tuple[torch.Tensor, torch.Tensor]]  # job -> decoded x̂0 of images 0 and 1


EVAL_FRACTION = 0.1  # held out for accuracy when the data has no validation split (digits)
MAX_EVAL_PAIRS = 1000  # the published SPM validates on Pick-a-Pic's 500 validation_unique pairs


@dataclass(frozen=True)
class PairsSpec:
    """Where the pairs are (prepared_layout) and which rows `validate` quarantined; picklable, so a worker
    process opens the same rows under the same indices."""

    pairs_dir: str
    quarantine: str | None  # validate's quarantine.parquet; None = no rows skipped
    seed: int  # of the hold-out split, when there is no validation split


class TrainingPairs:
    """The train split's good rows (quarantined ones skipped), then the eval rows, under one index:
    [0, n_train) train, [n_train, n) eval. Eval rows are Pick-a-Pic's validation_unique pairs when
    `prepare` wrote them (as the published SPM); else a seeded hold-out of train rows (digits).
    Rows are read on demand (PairShards): a large dataset never sits decoded in memory."""

    def __init__(self, spec: PairsSpec) -> None:
        pairs_dir = Path(spec.pairs_dir)
        def skipped(split: str) -> dict[str, set[int]]:
            return quarantined_rows(Path(spec.quarantine), split) if spec.quarantine else {}

        self.train = PairShards(pairs_dir, TRAIN_SPLIT, exclude=skipped(TRAIN_SPLIT))
        has_eval = bool(split_shards(pairs_dir, EVAL_SPLIT))
        self.eval = PairShards(pairs_dir, EVAL_SPLIT, exclude=skipped(EVAL_SPLIT)) if has_eval else None
        n_train = len(self.train)
        if self.eval is not None:
            self.train_indices = list(range(n_train))
            self.eval_indices = list(range(n_train, n_train + len(self.eval)))
        else:
            self.train_indices, self.eval_indices = holdout_split(n_train, spec.seed)
        if not self.train_indices or not self.eval_indices:
            raise ValueError(f"{pairs_dir}: need pairs to train on and to evaluate, got {len(self.train_indices)} "
                             f"train and {len(self.eval_indices)} eval rows (after quarantine)")

    def __len__(self) -> int:
        return len(self.train) + (len(self.eval) if self.eval is not None else 0)

    def rows(self, indices: Sequence[int]) -> pd.DataFrame:
        """Rows in the order asked, with an index naming their source (`shard:row`) for error messages."""
        n_train = len(self.train)
        parts, order = [], []
        for table, wanted, offset in ((self.train, [i for i in indices if i < n_train], 0),
                                      (self.eval, [i for i in indices if i >= n_train], n_train)):
            if wanted:
                frame = table.rows([i - offset for i in wanted])
                frame.index = [f"{table.row_ids[i - offset][0]}:{table.row_ids[i - offset][1]}" for i in wanted]
                parts.append(frame)
                order += wanted
        frame = pd.concat(parts) if len(parts) > 1 else parts[0]
        position = {index: k for k, index in enumerate(order)}
        return frame.iloc[[position[i] for i in indices]]

    def column(self, name: str, indices: Sequence[int]) -> np.ndarray:
        """One cheap column (no images) for the given rows."""
        train = np.asarray(self.train.column(name))
        values = np.concatenate([train, np.asarray(self.eval.column(name))]) if self.eval is not None else train
        return values[np.asarray(indices, dtype=int)] if len(indices) else values[:0]


def check_rows(pairs: TrainingPairs, source: Path) -> None:
    """Labels and captions of every row used (cheap columns, no images): a row `validate` should have
    quarantined is named here rather than failing mid-run (e.g. when validate was skipped)."""
    indices = pairs.train_indices + pairs.eval_indices
    label_0, label_1 = (pairs.column(c, indices).astype(float) for c in ("label_0", "label_1"))
    captions = pairs.column("caption", indices)
    problems = {
        "label_0/label_1 NaN or inf": ~(np.isfinite(label_0) & np.isfinite(label_1)),
        "label_0 + label_1 != 1": np.abs(label_0 + label_1 - 1) > 1e-6,
        "empty caption": np.array([not isinstance(c, str) or not c.strip() for c in captions], dtype=bool),
    }
    for what, bad in problems.items():
        rows = np.flatnonzero(bad)
        if len(rows):
            names = [pairs.rows([indices[i]]).index[0] for i in rows[:5]]
            raise ValueError(f"{source}: {what} at {names} ({len(rows)} rows): run `validate`, which quarantines them")


def data_digest(pairs_dir: Path, quarantine: Path | None) -> list:
    """What identifies the training data for a checkpoint's fingerprint: shard names, sizes, row counts,
    and the quarantine file's bytes (DVC guarantees the rest: a changed shard changes its size or the run)."""
    shards = [(p.name, p.stat().st_size, pq.ParquetFile(p).metadata.num_rows) for p in sorted(pairs_dir.glob("*.parquet"))]
    digest = hashlib.sha256(quarantine.read_bytes()).hexdigest() if quarantine and quarantine.is_file() else None
    return [shards, digest]


def holdout_split(num_pairs: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded ~10% hold-out (at least 1, at most MAX_EVAL_PAIRS)."""
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = min(MAX_EVAL_PAIRS, max(1, round(EVAL_FRACTION * num_pairs))) if num_pairs > 1 else 0
    return sorted(order[num_eval:]), sorted(order[:num_eval])


def pair_loader(pairs: TrainingPairs, size: int) -> PairLoader:
    """Decode rows on demand; undecodable images name their shard and row."""
    def load(indices: Sequence[int]) -> PairBatch:
        rows = pairs.rows(indices)
        images = {c: decode_column(rows, c, size) for c in ("jpg_0", "jpg_1")}
        counts = rows["num_example_per_prompt"] if "num_example_per_prompt" in rows else None
        weights = None if counts is None else torch.tensor(1.0 / counts.fillna(1).clip(lower=1).to_numpy(float),
                                                           dtype=torch.float32)
        return PairBatch(prompts=[str(c) for c in rows["caption"]], images_0=images["jpg_0"], images_1=images["jpg_1"],
                         label_0=torch.tensor(rows["label_0"].to_numpy(float), dtype=torch.float32),
                         label_1=torch.tensor(rows["label_1"].to_numpy(float), dtype=torch.float32), weights=weights)
    return load


def plan_training_jobs(train_indices: Sequence[int], steps: int, batch_size: int, num_train_timesteps: int,
                       seed: int) -> list[X0Job]:
    """One job per SPM step: shuffled batches (epoch by epoch), t ~ U{0..T-1} per pair, a noise seed."""
    generator = torch.Generator().manual_seed(seed)
    batches = batch_indices(train_indices, batch_size, generator)
    jobs = []
    for _ in range(steps):
        indices = next(batches)
        timesteps = sample_timesteps(len(indices), num_train_timesteps, generator)
        jobs.append(X0Job(tuple(indices), tuple(timesteps.tolist()),
                          int(torch.randint(2**62, (1,), generator=generator))))
    return jobs


def plan_eval_jobs(indices: Sequence[int], timesteps: Sequence[int], batch_size: int, seed: int) -> list[X0Job]:
    """Every eval pair at every fixed t; the noise of a batch depends only on `seed` and its position."""
    return [X0Job(tuple(indices[start:start + batch_size]), (int(t),) * len(indices[start:start + batch_size]),
                  seed * 1_000_003 + start)
            for t in timesteps for start in range(0, len(indices), batch_size)]


def x0_of_job(model: DiffusionModel, load_batch: PairLoader, job: X0Job,
              guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch = load_batch(job.indices)
    return noisy_x0_images(model, batch.images_0, batch.images_1, batch.prompts, torch.tensor(job.timesteps),
                           guidance_scale, torch.Generator().manual_seed(job.seed))


def in_process_source(model: DiffusionModel, load_batch: PairLoader, guidance_scale: float) -> X0Source:
    return lambda job: x0_of_job(model, load_batch, job, guidance_scale)


# ----------------------------------------------------------------------------------------------------
# the worker process (CPU)


@dataclass(frozen=True)
class X0WorkerSpec:
    model_location: str
    vae_location: str | None
    pairs: PairsSpec
    resolution: int
    guidance_scale: float


_worker: tuple[DiffusionModel, PairLoader, float] | None = None


def _init_worker(spec: X0WorkerSpec) -> None:
    global _worker
    torch.set_num_threads(1)
    model = load_diffusion_model(spec.model_location, vae=spec.vae_location)
    _worker = (model, pair_loader(TrainingPairs(spec.pairs), spec.resolution), spec.guidance_scale)


def _worker_x0(job: X0Job) -> tuple[torch.Tensor, torch.Tensor]:
    model, load_batch, guidance_scale = _worker
    return x0_of_job(model, load_batch, job, guidance_scale)


@contextmanager
def prefetched_source(spec: X0WorkerSpec, jobs: Sequence[X0Job]) -> Iterator[X0Source]:
    """Start computing every job in one worker process (one thread) now; the source returns a job's
    result once it is done (as often as asked: the eval jobs serve before and after training). A job
    that was not planned is an error (it would silently cost time)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker, initargs=(spec,)) as pool:
        futures: dict[X0Job, Future] = {}
        for job in jobs:
            futures.setdefault(job, pool.submit(_worker_x0, job))

        def source(job: X0Job) -> tuple[torch.Tensor, torch.Tensor]:
            if job not in futures:
                raise KeyError(f"x̂0 job not planned: {job}")
            return futures[job].result()

        try:
            yield source
        finally:
            for future in futures.values():
                future.cancel()
