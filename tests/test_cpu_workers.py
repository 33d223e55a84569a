"""Sampling in worker processes: the same images whatever the number of workers, and as in-process."""

import pytest
import torch
from tiny_models import build_tiny_sd

from spo.diffusion.cpu_workers import SamplerSpec, sample_batches
from spo.diffusion.sampling import sample_images
from spo.models.diffusion_model import load_diffusion_model

BATCHES = [(["a cat", "a dog", "a cat"], [0, 1, 2]), (["a bird"], [3]), (["a fish", "a dog"], [4, 5])]


@pytest.mark.slow  # spawns worker processes (20 s)
def test_images_do_not_depend_on_the_number_of_workers(tmp_path):
    spec = SamplerSpec(str(build_tiny_sd(tmp_path / "sd")), None, 16, 4, 5.0, 1.0)  # eta 1: batch-seeded noise
    two = sample_batches(spec, BATCHES, workers=2)
    assert [im.shape for im in two] == [(3, 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a worker runs on
    try:
        model = load_diffusion_model(spec.model_dir)
        here = [sample_images(model, p, s, resolution=16, num_inference_steps=4, guidance_scale=5.0, eta=1.0)
                for p, s in BATCHES]
        in_process = sample_batches(spec, BATCHES, workers=0)
    finally:
        torch.set_num_threads(threads)
    # 2 worker processes = this process (a worker's one thread) = plain sampling: one interpreter fewer than
    # comparing 1 worker with 2, and the same claim (workers and this process compute whole batches alike)
    assert all(torch.equal(a, b) for a, b in zip(two, here))
    assert all(torch.equal(a, b) for a, b in zip(two, in_process))
