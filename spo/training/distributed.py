"""Data-parallel training across processes (GPUs), launched by `accelerate launch` or torchrun.

accelerate sets the processes up (`PartialState`: rank, world size, device, the process group). We do
not wrap the SPM in DDP: its scoring path is not `forward()` (text and time-conditioned image towers
called separately), so after `backward()` the gradients are averaged explicitly (`average_gradients`),
which is what DDP computes. Losses are normalised over the *global* batch (`global_sum`), so N
processes with B pairs each take the same step as one process with N·B pairs.
With one process everything here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_processes() -> Processes:
    """This process's place: from accelerate's state when launched by `accelerate launch` or torchrun on
    GPUs, else one process on the GPU if there is one. accelerate sees a CPU-only torchrun as one process
    (DistributedType.NO); then the gloo group is set up here from torchrun's environment, so the same
    code runs (and is tested) data-parallel on CPUs."""
    import os

    from accelerate import PartialState

    state = PartialState()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes > 1 or world == 1:
        return Processes(state.process_index, state.num_processes, state.device)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes (no gradient): e.g. the total loss weight of the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


BUCKET_ELEMENTS = 2**26  # 256 MB of fp32 per all-reduce: few calls, bounded extra memory (ViT-H: ~4 GB of grads)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype, up to BUCKET_ELEMENTS per bucket."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for grad in grads:
        if not buckets or buckets[-1][0].dtype != grad.dtype or size + grad.numel() > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    return buckets


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of every gradient over processes, a flat bucket per all-reduce (what DDP does, unoverlapped)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for bucket in _buckets([p.grad for p in params if p.grad is not None]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (any number of rows, same trailing shape), concatenated in rank order:
    SPO's kept pairs differ in number per process. Sizes first, then one padded all_gather."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])
