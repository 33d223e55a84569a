"""Diffusion-DPO (DESIGN 3.3): the loss against hand numbers and an independent per-pair computation, ties
dropped and counted, a step that moves the policy and leaves the reference alone, resume and two processes
equal to one uninterrupted run, and the stage's outputs (also when switched off)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import digits_config, good_pairs_frame
from test_train_spm import write_shards
from tiny_models import build_tiny_sd

from spo.data.prepared_layout import BASE_MODEL_DIR, PAIRS_DIR
from spo.models.diffusion_model import load_diffusion_model
from spo.models.lora import DISABLED_FILE, LORA_WEIGHTS_FILE
from spo.tracking.tracker import MemoryTracker
from spo.training.checkpoints import CheckpointPolicy
from spo.training.distributed import Processes
from spo.training.dpo_loss import dpo_loss
from spo.training.dpo_trainer import (
    DPORunOptions,
    decided_pairs,
    denoising_errors,
    load_step_pairs,
    plan_steps,
    train_dpo,
)
from spo.training.spm_inputs import PairsSpec, TrainingPairs, pair_loader
from spo.training.trainable_unet import prepare_unet

CFG = dataclasses.replace(digits_config().train_dpo, pairs_per_step=4, pairs_per_batch=2, max_steps=3,
                          learning_rate=1e-3, checkpoint_every=1)


def test_dpo_loss_is_ln2_at_init_and_equals_a_hand_computation():
    e = torch.tensor([0.30, 0.10])
    same = dpo_loss(e, e.flip(0), e, e.flip(0), beta=5000.0)
    assert same.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert same.implicit_accuracy.tolist() == [0.5, 0.5]

    # pair 1: the policy improves the winner by 1e-4 and worsens the loser by 2e-4 -> margin 2500 * 3e-4
    # pair 2: the other way round, by 1e-4 on each -> margin -2500 * 2e-4
    model_w, model_l = torch.tensor([0.2999, 0.1001]), torch.tensor([0.4002, 0.1999])
    ref_w, ref_l = torch.tensor([0.3000, 0.1000]), torch.tensor([0.4000, 0.2000])
    out = dpo_loss(model_w, model_l, ref_w, ref_l, beta=5000.0)
    inside = [-2500 * ((-1e-4) - (2e-4)), -2500 * ((1e-4) - (-1e-4))]  # 0.75, -0.5
    expected = sum(math.log1p(math.exp(-x)) for x in inside) / 2
    assert out.inside.tolist() == pytest.approx(inside, rel=1e-3)
    assert out.loss.item() == pytest.approx(expected, rel=1e-3)
    assert out.implicit_accuracy.tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared dir with a tiny SD pipeline and 24 Pick-a-Pic rows (6 ties) in two shards."""
    root = tmp_path_factory.mktemp("dpo_world")
    build_tiny_sd(root / BASE_MODEL_DIR)
    write_shards(root / PAIRS_DIR, good_pairs_frame(24), rows_per_shard=16)
    return root


def table(world):
    return TrainingPairs(PairsSpec(str(world / PAIRS_DIR), None, seed=0))


def test_ties_are_dropped_and_counted_and_the_winner_is_the_label_1_image(world):
    pairs = table(world)
    decided = decided_pairs(pairs)
    labels = pairs.column("label_0", pairs.train_indices)
    assert decided.num_ties == int((labels == 0.5).sum()) > 0
    assert decided.num_pairs + decided.num_ties == len(pairs.train_indices)
    assert all(labels[pairs.train_indices.index(r)] != 0.5 for r in decided.rows)
    assert all(decided.winner_is_0[r] == (labels[pairs.train_indices.index(r)] == 1.0) for r in decided.rows)
    for job in plan_steps(decided, CFG, 1000, seed=0):  # every planned row is a decided one
        assert set(job.indices) <= set(decided.rows) and len(job.indices) == CFG.pairs_per_step


def test_denoising_errors_equal_a_per_pair_computation_with_diffusers_own_add_noise(world):
    """The batched policy/reference errors against one pair at a time: the winner is the label-1 image,
    both images get the same t and ε, the target is ε, the error a mean over latent elements."""
    model = load_diffusion_model(str(world / BASE_MODEL_DIR))
    torch.manual_seed(0)
    prepare_unet(model, CFG)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a policy that differs from the reference
    pairs = table(world)
    decided = decided_pairs(pairs)
    job = plan_steps(decided, CFG, 1000, seed=3)[0]
    batch = load_step_pairs(model, pair_loader(pairs, 16), decided, job, [0, 1, 2])
    err = denoising_errors(model, batch.latents_win, batch.latents_lose, batch.noise, batch.timesteps,
                           batch.prompts, 16)
    raw = pairs.rows([job.indices[p] for p in range(3)])
    for k in range(3):
        t = batch.timesteps[k:k + 1]
        cond = model.encode_prompts([str(raw["caption"].iloc[k])], 16)
        expect = {}
        for side, z in (("win", batch.latents_win[k:k + 1]), ("lose", batch.latents_lose[k:k + 1])):
            x_t = model.scheduler.add_noise(z, batch.noise[k:k + 1], t)
            for who in ("model", "ref"):
                with torch.no_grad():
                    if who == "ref":
                        model.unet.disable_adapters()
                    pred = model.unet(x_t, t, encoder_hidden_states=cond.hidden_states).sample
                    model.unet.enable_adapters()
                expect[f"{who}_{side}"] = torch.nn.functional.mse_loss(pred, batch.noise[k:k + 1]).item()
        got = {key: getattr(err, key)[k].item() for key in expect}
        assert got == pytest.approx(expect, rel=1e-5)
        assert got["model_win"] != pytest.approx(got["ref_win"], rel=1e-6)
    # the winner's latent is the label-1 image's
    win_0 = decided.winner_is_0[job.indices[0]]
    images = pair_loader(pairs, 16)([job.indices[0]])
    assert torch.equal(torch.where(torch.tensor(win_0), images.images_0, images.images_1), images.images_0 if win_0
                       else images.images_1)


def run(world, cfg=CFG, options=None, full_finetune=False):
    cfg = dataclasses.replace(cfg, full_finetune=full_finetune)
    model = load_diffusion_model(str(world / BASE_MODEL_DIR))
    torch.manual_seed(0)
    params, reference = prepare_unet(model, cfg)
    options = options or DPORunOptions()
    options.reference = reference
    pairs = table(world)
    history = train_dpo(model, pair_loader(pairs, 16), decided_pairs(pairs), params, cfg, resolution=16, seed=0,
                        tracker=MemoryTracker(), options=options)
    return model, [p.detach().clone() for p in params], history, reference


def reference_output(model, reference, x, t, cond):
    from spo.training.trainable_unet import lora_reference

    with torch.no_grad(), (reference or lora_reference(model))() as ref:
        return ref(x, t, encoder_hidden_states=cond.hidden_states).sample


@pytest.mark.parametrize("full_finetune", [False, True])
def test_one_step_moves_the_policy_and_leaves_the_reference_frozen(world, full_finetune):
    one = dataclasses.replace(CFG, max_steps=1)
    model0 = load_diffusion_model(str(world / BASE_MODEL_DIR))
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    cond = model0.encode_prompts(["a handwritten digit 1", "a handwritten digit 2"], 16)
    with torch.no_grad():
        before = model0.unet(x, t, encoder_hidden_states=cond.hidden_states).sample
    model, params, history, reference = run(world, one, full_finetune=full_finetune)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert history[0]["implicit_accuracy"] == 0.5 and history[0]["pairs_seen"] == CFG.pairs_per_step
    torch.manual_seed(0)
    model_again = load_diffusion_model(str(world / BASE_MODEL_DIR))
    start, _ = prepare_unet(model_again, dataclasses.replace(one, full_finetune=full_finetune))
    assert max((a - b.detach()).abs().max().item() for a, b in zip(params, start)) > 0  # the step moved it
    with torch.no_grad():
        after = model.unet(x, t, encoder_hidden_states=cond.hidden_states).sample
    assert not torch.allclose(after, before)  # the policy's outputs changed ...
    assert torch.equal(reference_output(model, reference, x, t, cond), before)  # ... the reference's did not


class Interrupted(RuntimeError):
    pass


class DiesAtStep(MemoryTracker):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def log_metrics(self, metrics, step=None):
        if step == self.step and "loss" in metrics:
            raise Interrupted
        super().log_metrics(metrics, step=step)


def test_resume_equals_uninterrupted(world, tmp_path):
    torch.set_num_threads(1)
    _, straight_params, straight, _ = run(world)
    policy = CheckpointPolicy(tmp_path / "ck", every=1, fingerprint="run", unit="step")
    cfg = CFG
    model = load_diffusion_model(str(world / BASE_MODEL_DIR))
    torch.manual_seed(0)
    params, _ = prepare_unet(model, cfg)
    pairs = table(world)
    with pytest.raises(Interrupted):
        train_dpo(model, pair_loader(pairs, 16), decided_pairs(pairs), params, cfg, resolution=16, seed=0,
                  tracker=DiesAtStep(3), options=DPORunOptions(checkpoints=policy))
    assert policy.steps_on_disk() == [1, 2]
    state = policy.latest()
    _, resumed_params, resumed, _ = run(world, options=DPORunOptions(checkpoints=policy, resume=state))
    assert [h["step"] for h in resumed] == [1, 2, 3]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(resumed_params, straight_params)) < 1e-7


# beta 50, not 5000: at 5000 the loss reads mse differences of ~1e-4, so the float-order differences of
# two processes (2e-8 in the parameters after one step, measured) come back as 1e-4 in the next loss.
# Which pairs each process takes is what this test checks, and at beta 50 a wrong share shows as plainly.
PER_PAIR = dataclasses.replace(CFG, beta=50.0, learning_rate=1e-2)


def _train_in_process(rank: int, world_size: int, world_dir: str, out: str) -> None:
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world_size)
    try:
        _, params, history, _ = run(Path(world_dir), PER_PAIR, options=DPORunOptions(
            processes=Processes(rank, world_size, torch.device("cpu"))))
        if rank == 0:
            torch.save({"params": params, "history": history}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (~15 s)
def test_two_processes_equal_one(world, tmp_path):
    torch.set_num_threads(1)
    _, params, history, _ = run(world, PER_PAIR)
    out = str(tmp_path / "two.pt")
    mp.spawn(_train_in_process, args=(2, str(world), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    # the same steps up to float summation order (gradients summed across processes, not micro-batches)
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in history], rel=1e-4)
    assert [h["pairs_seen"] for h in two["history"]] == [h["pairs_seen"] for h in history]
    model = load_diffusion_model(str(world / BASE_MODEL_DIR))
    torch.manual_seed(0)
    start = [p.detach().clone() for p in prepare_unet(model, CFG)[0]]
    worst = max((a - b).abs().max().item() for a, b in zip(two["params"], params))
    moved = max((a - s).abs().max().item() for a, s in zip(params, start))
    assert moved > 100 * worst, (worst, moved)  # Adam turns float noise in ~0 gradients into ~lr x 1e-4


# ----------------------------------------------------------------------------------------------------
# the stage


def stage_config(**dpo):
    from conftest import REPO_ROOT  # noqa: F401  (digits_config reads the profile from the repo)

    return digits_config(train_dpo={"pairs_per_step": 4, "pairs_per_batch": 4, "max_steps": 2, **dpo},
                         learning_curve={"points": 0})


def test_stage_writes_the_lora_the_history_and_the_counts(world, tmp_path):
    from spo.stages import train_dpo as stage

    tracker = MemoryTracker()
    metrics = stage.run(stage_config(), prepared_dir=world, out_dir=tmp_path / "dpo", tracker=tracker)
    assert (tmp_path / "dpo" / "lora" / LORA_WEIGHTS_FILE).is_file()
    history = np.genfromtxt(tmp_path / "dpo" / "history.csv", delimiter=",", names=True)
    assert list(history["step"]) == [1, 2] and history["loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    saved = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    # the train rows: the SPM's hold-out (seeded by cfg.seed; no validation split here) is left out too
    pairs = TrainingPairs(PairsSpec(str(world / PAIRS_DIR), None, seed=stage_config().seed))
    ties = int((pairs.column("label_0", pairs.train_indices) == 0.5).sum())
    assert saved["ties_dropped"] == ties > 0 and saved["decided_pairs"] == len(pairs.train_indices) - ties
    assert saved["pairs_seen"] == 8 and saved == pytest.approx(metrics)
    assert tracker.params["train_dpo.ties_dropped"] == ties


def test_disabled_stage_writes_a_marker_that_evaluation_skips(world, tmp_path):
    from spo.evaluation.evaluated_models import resolve_models
    from spo.stages import train_dpo as stage

    out = tmp_path / "dpo"
    assert stage.run(stage_config(enabled=False), prepared_dir=world, out_dir=out,
                     tracker=MemoryTracker()) == {"enabled": 0.0}
    assert (out / "lora" / DISABLED_FILE).is_file() and not (out / "lora" / LORA_WEIGHTS_FILE).exists()
    cfg = digits_config(evaluate={"models": [{"name": "base"}, {"name": "other", "lora": str(tmp_path)},
                                             {"name": "dpo", "run_output": "dpo"}]})
    (tmp_path / LORA_WEIGHTS_FILE).write_bytes(b"")  # a LoRA location that exists (never loaded here)
    names = [m.name for m in resolve_models(cfg, str(world / BASE_MODEL_DIR), {"dpo": out}, device="cpu")]
    assert names == ["base", "other"]
