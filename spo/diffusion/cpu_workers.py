"""Several CPU cores at once: sampling batches spread over worker processes, or one job beside the caller.

The digits world's networks are so small that a second torch thread adds little (a 2-core machine ran
`prepare` at ~1.2 cores), while sampling thousands of independent images splits perfectly. Each worker
loads the model from its directory and runs torch on **one** thread, and every batch is sampled whole by
one worker, so the images do not depend on the number of workers or cores: only on the batches.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from spo.diffusion.sampling import sample_images
from spo.models.diffusion_model import DiffusionModel, load_diffusion_model

T = TypeVar("T")


@dataclass(frozen=True)
class SamplerSpec:
    """What a worker loads, and how it samples."""

    model_dir: str
    lora_dir: str | None
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    eta: float
    vae_dir: str | None = None  # a replacement VAE (model.vae)
    device: str = "cpu"
    unet_dir: str | None = None  # a full UNet that replaces the base's (a fine-tuned one)
    dtype: str = "float32"  # torch dtype name of the frozen nets


MAX_WORKERS = 4  # each worker holds torch + diffusers (~1 GB): more would not pay on a laptop


def sampling_workers(images: int | None = None) -> int:
    """Worker processes for CPU sampling: one per core, at most MAX_WORKERS (results do not depend on it).
    Given the number of images to make, 0 (this process) when there are too few to pay for a worker's
    interpreter start (~8 s of imports): fewer than IMAGES_PER_WORKER per worker."""
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    return workers if images is None else min(workers, images // IMAGES_PER_WORKER)


IMAGES_PER_WORKER = 128  # ~2 s of digits sampling on one thread, a quarter of a worker's start-up


def _one_thread() -> None:
    torch.set_num_threads(1)


@contextmanager
def in_worker(fn: Callable[..., T], *args: Any) -> Iterator[Future[T]]:
    """Run `fn(*args)` in a fresh worker process on one thread while the caller goes on; the block's
    end waits for it. `fn` and its result must pickle."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_one_thread) as pool:
        yield pool.submit(fn, *args)


Batch = tuple[list[str], list[int]]  # (prompts, seeds)
_loaded: dict[SamplerSpec, DiffusionModel] = {}  # per process: each model loads once


def _model(spec: SamplerSpec) -> DiffusionModel:
    if spec not in _loaded:
        dtype = getattr(torch, spec.dtype)
        model = load_diffusion_model(spec.model_dir, vae=spec.vae_dir, dtype=dtype, device=spec.device)
        if spec.unet_dir is not None:
            from spo.models.lora import load_full_unet

            model.unet = load_full_unet(Path(spec.unet_dir), dtype=dtype).to(spec.device)
        if spec.lora_dir is not None:
            from spo.models.lora import load_lora

            load_lora(model.unet, Path(spec.lora_dir))
        _loaded[spec] = model
    return _loaded[spec]


def _sample(job: tuple[SamplerSpec, Batch]) -> torch.Tensor:
    spec, (prompts, seeds) = job
    return sample_images(_model(spec), prompts, seeds, resolution=spec.resolution,
                         num_inference_steps=spec.num_inference_steps, guidance_scale=spec.guidance_scale,
                         eta=spec.eta).cpu()


def iter_sample_jobs(jobs: Sequence[tuple[SamplerSpec, Batch]], workers: int) -> Iterator[torch.Tensor]:
    """Images in [-1, 1] for each (model, batch) job, yielded in order as each is done (so a caller can
    write them as they come). `workers` >= 1: that many worker processes on one thread each (the same
    images for any count; several models share one pool); 0: this process (a GPU, or torch's threads)."""
    if workers == 0:
        for job in jobs:
            yield _sample(job)
        return
    if not jobs:
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch started its thread pool can deadlock
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=ctx,
                             initializer=_one_thread) as pool:
        yield from pool.map(_sample, jobs)


def sample_jobs(jobs: Sequence[tuple[SamplerSpec, Batch]], workers: int, progress_bar=None) -> list[torch.Tensor]:
    """`iter_sample_jobs` collected into a list (a progress bar ticks once per job)."""
    out = []
    for images in iter_sample_jobs(jobs, workers):
        out.append(images)
        if progress_bar is not None:
            progress_bar.update(1)
    return out


def sample_batches(spec: SamplerSpec, batches: Sequence[Batch], workers: int, progress_bar=None) -> list[torch.Tensor]:
    """`sample_jobs` for one model."""
    return sample_jobs([(spec, batch) for batch in batches], workers, progress_bar)
