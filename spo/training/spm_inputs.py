"""The SPM's inputs: which pairs, at which t, with which noise, and their decoded one-step x̂0.

The x̂0 of a pair depends on the frozen base model, the pair, t and the noise only, never on the SPM, so
every batch is planned up front as an `X0Job` (row indices, timesteps, a noise seed). In-process
(GPU) a job is computed when asked for; on a CPU a worker process computes all jobs, in order, on the
other core while this process trains (the preference phase first, then the SPM on jobs already done).
Either way job i gives the same x̂0, so the result does not depend on where it was computed.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from spo.data.pickapic import decode_column, read_pairs
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


def pair_loader(table: pd.DataFrame, size: int, source: Path) -> PairLoader:
    """Decode rows on demand, so a large table never sits decoded in memory."""
    def load(indices: Sequence[int]) -> PairBatch:
        rows = table.iloc[list(indices)]
        try:
            images = {c: decode_column(rows, c, size) for c in ("jpg_0", "jpg_1")}
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err
        return PairBatch(prompts=[str(c) for c in rows["caption"]], images_0=images["jpg_0"], images_1=images["jpg_1"],
                         label_0=torch.tensor(rows["label_0"].to_numpy(float), dtype=torch.float32),
                         label_1=torch.tensor(rows["label_1"].to_numpy(float), dtype=torch.float32))
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
    pairs_path: str
    resolution: int
    guidance_scale: float


_worker: tuple[DiffusionModel, PairLoader, float] | None = None


def _init_worker(spec: X0WorkerSpec) -> None:
    global _worker
    torch.set_num_threads(1)
    table = read_pairs(spec.pairs_path).reset_index(drop=True)
    model = load_diffusion_model(spec.model_location, vae=spec.vae_location)
    _worker = (model, pair_loader(table, spec.resolution, Path(spec.pairs_path)), spec.guidance_scale)


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
