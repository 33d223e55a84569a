"""SPO training that stops and resumes, and that runs in two processes: both
must take the optimizer steps of one uninterrupted single-process run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_spo_training import PromptAwareScorer
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import add_lora
from spo.tracking.tracker import MemoryTracker
from spo.training.checkpoints import CheckpointPolicy
from spo.training.distributed import Processes
from spo.training.spo_trainer import SPORunOptions, pairs_per_process_step, share_out, train_spo
from spo.training.step_sampling import StepPairs

RUN_CFG = dataclasses.replace(load_profile("digits").train_spo, mixed_precision="fp32", num_epochs=1,
                              prompts_per_round=3, prompts_per_rollout=2, pairs_per_step=8, pairs_per_batch=2,
                              learning_rate=1e-3, num_inference_steps=10, branch_start_step=2, threshold=0.0)
# threshold 0: every prompt gives 8 pairs, so each round's total is even and 2 processes drop no remainder
# (with an odd total, the published share-out drops one pair there and the runs differ by that pair)
RUN_PROMPTS = ["one", "two", "three", "four", "five", "six", "seven"]  # rounds of 3, 3, 1 prompts


def scorer_for(prompts):
    return PromptAwareScorer()


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def run(model_dir, options=None, score_for=scorer_for):
    model = load_diffusion_model(str(model_dir))
    torch.manual_seed(0)
    params = add_lora(model.unet, RUN_CFG)
    history = train_spo(model, score_for, RUN_PROMPTS, params, RUN_CFG, resolution=16, seed=0,
                        tracker=MemoryTracker(), options=options)
    return [p.detach().clone() for p in params], history


def initial_params(model_dir):
    model = load_diffusion_model(str(model_dir))
    torch.manual_seed(0)
    return [p.detach().clone() for p in add_lora(model.unet, RUN_CFG)]


def assert_same_run(params_a, history_a, params_b, history_b, start):
    assert [h["step"] for h in history_a] == [h["step"] for h in history_b]
    assert [h["num_pairs"] for h in history_a] == [h["num_pairs"] for h in history_b]
    assert [h["loss"] for h in history_a] == pytest.approx([h["loss"] for h in history_b], rel=1e-4)
    worst = max((a - b).abs().max().item() for a, b in zip(params_a, params_b))
    moved = max((a - s).abs().max().item() for a, s in zip(params_a, start))
    assert moved > 1000 * worst, (worst, moved)


class Interrupted(RuntimeError):
    pass


@pytest.mark.slow  # four short training runs (10 s)
def test_resume_equals_uninterrupted(tiny_sd_dir, tmp_path):
    torch.set_num_threads(1)
    straight_params, straight = run(tiny_sd_dir)
    start = initial_params(tiny_sd_dir)
    assert len({h["round"] for h in straight}) == 3

    policy = CheckpointPolicy(tmp_path / "ck", every=1, fingerprint="run", keep=2, unit="round")
    calls = {"n": 0}

    def dies_in_round_three(prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted
        return PromptAwareScorer()

    with pytest.raises(Interrupted):
        run(tiny_sd_dir, SPORunOptions(checkpoints=policy), score_for=dies_in_round_three)
    assert policy.steps_on_disk() == [1, 2]  # every round, never after the last; the newest 2 kept
    state = policy.latest()
    assert state["round"] == 2 and state["optimizer_steps"] == sum(h["round"] < 2 for h in straight)
    resumed_params, resumed = run(tiny_sd_dir, SPORunOptions(checkpoints=policy, resume=state))
    assert_same_run(resumed_params, resumed, straight_params, straight, start)


def test_share_out_deals_the_permutation_round_robin():
    n = 11
    pairs = StepPairs(*(torch.arange(n).float()[:, None] for _ in range(3)), torch.zeros(n), torch.arange(n),
                      torch.zeros(n, dtype=torch.long))
    one = share_out(pairs, Processes(0, 1, torch.device("cpu")), seed=3).prompt_index
    two = [share_out(pairs, Processes(r, 2, torch.device("cpu")), seed=3).prompt_index for r in (0, 1)]
    assert len(one) == 11 and len(two[0]) == len(two[1]) == 5  # remainder dropped
    # step s of rank r (2 pairs each) holds pairs of the single process's step-s block of 4
    for s in range(2):
        block = set(one[4 * s:4 * s + 4].tolist())
        assert set(two[0][2 * s:2 * s + 2].tolist()) | set(two[1][2 * s:2 * s + 2].tolist()) == block
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        pairs_per_process_step(dataclasses.replace(RUN_CFG, pairs_per_step=9), Processes(0, 2, torch.device("cpu")))


def _train_in_process(rank: int, world: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.pg", rank=rank, world_size=world)
    try:
        model = load_diffusion_model(model_dir)
        torch.manual_seed(0)
        params = add_lora(model.unet, RUN_CFG)
        history = train_spo(model, scorer_for, RUN_PROMPTS, params, RUN_CFG, resolution=16, seed=0,
                            tracker=MemoryTracker(),
                            options=SPORunOptions(processes=Processes(rank, world, torch.device("cpu"))))
        if rank == 0:
            torch.save({"params": [p.detach() for p in params], "history": history}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tiny_sd_dir, tmp_path):
    """The library loop in 2 gloo processes (the stage under `accelerate launch` runs in
    test_real_profiles_on_standins.py): the steps, pairs, losses and weights of 1 process."""
    out = tmp_path / "two.pt"
    mp.start_processes(_train_in_process, args=(2, str(tiny_sd_dir), str(out)), nprocs=2, start_method="spawn")
    two = torch.load(out, weights_only=True)
    torch.set_num_threads(1)
    one_params, one = run(tiny_sd_dir)
    start = initial_params(tiny_sd_dir)
    assert_same_run(two["params"], two["history"], one_params, one, start)
