"""SPM training that stops and resumes, and that runs in several processes: both must take exactly the
steps of one uninterrupted single-process run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_spm import CFG, load_pairs, tiny_world  # noqa: F401  (tiny_world: a fixture)

from spo.data.prepared_layout import BACKBONE_DIR, BASE_MODEL_DIR
from spo.models.diffusion_model import load_diffusion_model
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.tracking.tracker import MemoryTracker
from spo.training.checkpoints import CheckpointPolicy, fingerprint
from spo.training.distributed import average_gradients, global_sum
from spo.training.spm_inputs import X0Job, in_process_source, plan_training_jobs, x0_of_job
from spo.training.spm_training import LoopOptions, spm_loss, train_spm

STEPS = 4


def state(spm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in spm.state_dict().items()}


def test_weighted_loss_is_the_weighted_mean_of_pair_losses():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    l0 = torch.tensor([1.0, 0.5, 0.0])
    per_pair = [math.log(1 + math.exp(-2)), math.log(2) + math.log(0.5), math.log(1 + math.exp(-2))]
    w = torch.tensor([1.0, 0.5, 0.25])  # 1 / num_example_per_prompt
    expected = (1.0 * per_pair[0] + 0.5 * per_pair[1] + 0.25 * per_pair[2]) / 1.75
    assert spm_loss(s0, s1, l0, 1 - l0, w).item() == pytest.approx(expected, abs=1e-6)
    assert spm_loss(s0, s1, l0, 1 - l0).item() == pytest.approx(sum(per_pair) / 3, abs=1e-6)
    # across processes the normaliser is the global weight sum
    assert spm_loss(s0, s1, l0, 1 - l0, w, total_weight=3.5).item() == pytest.approx(expected / 2, abs=1e-6)


def test_checkpoint_policy_keeps_the_newest_and_refuses_another_runs(tmp_path):
    policy = CheckpointPolicy(tmp_path / "ck", every=2, fingerprint=fingerprint({"a": 1}), keep=2)
    assert [s for s in range(1, 9) if policy.due(s, 8)] == [2, 4, 6]  # never at the last step
    for step in (2, 4, 6):
        policy.save(step, {"value": step})
    assert policy.steps_on_disk() == [4, 6] and policy.latest()["value"] == 6
    other = CheckpointPolicy(tmp_path / "ck", every=2, fingerprint=fingerprint({"a": 2}))
    assert other.latest() is None  # another config: start over
    policy.clear()
    assert policy.steps_on_disk() == []


class Interrupted(RuntimeError):
    pass


def test_resume_equals_uninterrupted(tiny_world, tmp_path):  # noqa: F811 (the fixture)
    load_batch, indices = load_pairs(tiny_world)
    model = load_diffusion_model(str(tiny_world / BASE_MODEL_DIR))
    jobs = plan_training_jobs(indices, STEPS, CFG.batch_size, 1000, seed=0)
    source = in_process_source(model, load_batch, 5.0)

    def fresh():  # the t-embedder's init draws from torch's RNG (the stage seeds it, as here)
        torch.manual_seed(0)
        return StepAwarePreferenceModel.from_backbone(str(tiny_world / BACKBONE_DIR))

    straight = fresh()
    losses = train_spm(straight, load_batch, jobs, source, CFG, tracker=MemoryTracker())

    policy = CheckpointPolicy(tmp_path / "ck", every=2, fingerprint="run")
    calls = {"n": 0}

    def dies_after_two_steps(rows):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Interrupted
        return load_batch(rows)

    with pytest.raises(Interrupted):
        train_spm(fresh(), dies_after_two_steps, jobs, source, CFG, tracker=MemoryTracker(),
                  options=LoopOptions(checkpoints=policy))
    resume = policy.latest()
    assert resume["step"] == 2
    resumed = fresh()
    tracker = MemoryTracker()
    resumed_losses = train_spm(resumed, load_batch, jobs, source, CFG, tracker=tracker,
                               options=LoopOptions(checkpoints=policy, resume=resume))
    assert [s for s, _ in tracker.metrics["spm/loss"]] == [3, 4]  # only the steps left
    # equal up to float rounding: two uninterrupted runs in one process already differ by ~1e-7 here
    # (CPU kernels whose summation order depends on buffer alignment), so bitwise equality is not a promise
    assert resumed_losses[:2] == losses[:2] and resumed_losses == pytest.approx(losses, rel=1e-5)
    after, expected, start = state(resumed), state(straight), state(fresh())
    worst = max((after[k] - expected[k]).abs().max().item() for k in expected)
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    bad = sorted(((after[k] - expected[k]).abs().max().item(), k) for k in expected)[-3:]
    assert worst < 1e-5 and moved > 100 * worst, bad


# ----------------------------------------------------------------------------------------------------
# two processes (gloo on CPU) == one process with both batches


def merged_source(model, load_batch, pairs_of_jobs: dict[X0Job, tuple[X0Job, X0Job]]):
    """x̂0 of a merged batch = both halves' x̂0 (each with its own noise), as the two processes see them."""
    def source(job: X0Job):
        a, b = (x0_of_job(model, load_batch, part, 5.0) for part in pairs_of_jobs[job])
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    return source


def _train_in_process(rank: int, world: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=world)
    try:
        load_batch, indices = load_pairs(Path(root))
        model = load_diffusion_model(str(Path(root) / BASE_MODEL_DIR))
        jobs = plan_training_jobs(indices, STEPS * world, 4, 1000, seed=0)[rank::world]
        torch.manual_seed(0)
        spm = StepAwarePreferenceModel.from_backbone(str(Path(root) / BACKBONE_DIR))
        tracker = MemoryTracker()
        losses = train_spm(spm, load_batch, jobs, in_process_source(model, load_batch, 5.0), CFG_4, tracker=tracker)
        if rank == 0:
            torch.save({"losses": losses, "grad_norm": [v for _, v in tracker.metrics["spm/grad_norm"]]}, out)
    finally:
        dist.destroy_process_group()


CFG_4 = dataclasses.replace(CFG, batch_size=4, max_steps=STEPS)


def test_collectives_are_no_ops_in_one_process():
    grad = torch.nn.Parameter(torch.ones(3))
    grad.grad = torch.full((3,), 2.0)
    average_gradients([grad])
    assert torch.equal(grad.grad, torch.full((3,), 2.0)) and global_sum(torch.tensor(5.0)) == 5.0


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_with_both_batches(tiny_world, tmp_path):  # noqa: F811
    out = tmp_path / "rank0.pt"
    mp.start_processes(_train_in_process, args=(2, str(tiny_world), str(out)), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)

    torch.set_num_threads(1)
    load_batch, indices = load_pairs(tiny_world)
    model = load_diffusion_model(str(tiny_world / BASE_MODEL_DIR))
    halves = plan_training_jobs(indices, STEPS * 2, 4, 1000, seed=0)
    merged = {}
    for a, b in zip(halves[0::2], halves[1::2]):
        job = X0Job(a.indices + b.indices, a.timesteps + b.timesteps, a.seed)
        merged[job] = (a, b)
    torch.manual_seed(0)
    one = StepAwarePreferenceModel.from_backbone(str(tiny_world / BACKBONE_DIR))
    tracker = MemoryTracker()
    losses = train_spm(one, load_batch, list(merged), merged_source(model, load_batch, merged), CFG_4,
                       tracker=tracker)
    grad_norm = [v for _, v in tracker.metrics["spm/grad_norm"]]
    # step 1 starts from the same weights: the global loss and the averaged gradient agree to rounding
    assert two["losses"][0] == pytest.approx(losses[0], rel=1e-6)
    assert two["grad_norm"][0] == pytest.approx(grad_norm[0], rel=1e-5)
    # later steps too, up to Adam amplifying rounding in near-zero gradients (m / sqrt(v) ~ sign(g))
    assert two["losses"] == pytest.approx(losses, rel=1e-3) and two["grad_norm"] == pytest.approx(grad_norm, rel=1e-2)
