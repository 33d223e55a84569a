"""SPM training phases (loss, accuracy, labels, optimisation, x̂0 inputs) and the `train_spm` stage,
on a tiny real SD-format pipeline and a tiny CLIP built in the tests."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO_ROOT, good_pairs_frame
from test_step_aware_preference_model import build_tiny_clip, perturb_time_conditioning
from tiny_models import build_tiny_sd

from spo.config import load_profile
from spo.data.prepared_layout import BACKBONE_DIR, BASE_MODEL_DIR, MODELS_DIR, PAIRS_DIR, TRAIN_SPLIT, shard_name
from spo.data.quarantine import QUARANTINE_FILE, quarantine_schema
from spo.models.diffusion_model import load_diffusion_model
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.stages import train_spm as stage
from spo.tracking.tracker import MemoryTracker
from spo.training.spm_inputs import (
    MAX_EVAL_PAIRS,
    PairsSpec,
    TrainingPairs,
    X0WorkerSpec,
    holdout_split,
    in_process_source,
    pair_loader,
    plan_eval_jobs,
    plan_training_jobs,
    prefetched_source,
)
from spo.training.spm_training import (
    batch_indices,
    evaluate_accuracy,
    frozen_copy,
    make_optimizer,
    noisy_x0_images,
    optimizer_step,
    pairwise_accuracy,
    pairwise_correct,
    pickscore_labels,
    published_pair_credit,
    relabelled_by_backbone,
    spm_loss,
    train_preference_backbone,
    train_spm,
    warmup_decay_schedule,
)

CFG = dataclasses.replace(load_profile("digits").train_spm, preference_steps=3, preference_learning_rate=1e-3,
                          learning_rate=1e-3, warmup_steps=1, max_steps=3, batch_size=4, mixed_precision="fp32",
                          eval_timesteps=(0, 501))
PROMPTS = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three", "digit four"]


# ----------------------------------------------------------------------------------------------------
# loss, accuracy, labels: values by hand


def test_loss_equal_scores_hard_label_is_ln2():
    loss = spm_loss(torch.tensor([3.0, -1.0]), torch.tensor([3.0, -1.0]), torch.tensor([1.0, 0.0]),
                    torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_loss_hand_values_with_ties():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([0.0, 0.0, 0.0, 5.0])
    l0, l1 = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0.0, 1.0, 0.5, 0.5])
    expected = [math.log(1 + math.exp(-2)),  # win by 2: -log σ(2)
                math.log(2),  # equal scores, image 1 preferred
                -0.5 * math.log(1 / (1 + math.exp(-1))) - 0.5 * math.log(1 / (1 + math.exp(1))) + math.log(0.5),
                0.0]  # a tie scored equal costs nothing (PickScore's +log 0.5)
    assert spm_loss(s0, s1, l0, l1).item() == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_loss_gradient_pushes_the_winner_up_and_ties_together():
    s0 = torch.tensor([0.0, 1.0], requires_grad=True)
    s1 = torch.tensor([0.0, 0.0], requires_grad=True)
    spm_loss(s0, s1, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])).backward()
    assert s0.grad[0] < 0 < s1.grad[0]  # gradient descent raises s0, lowers s1
    assert s0.grad[1] > 0 > s1.grad[1]  # the tie pulls the scores together


def test_pairwise_accuracy_excludes_ties_and_counts_equal_scores_wrong():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 9.0])
    l0 = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0])
    assert pairwise_correct(s0, s1, l0, 1 - l0) == (2, 4)  # rows 0 and 4 right, 1 wrong, 2 equal, 3 tie
    assert pairwise_accuracy(s0, s1, l0, 1 - l0) == 0.5
    assert math.isnan(pairwise_accuracy(s0[3:4], s1[3:4], l0[3:4], 1 - l0[3:4]))


def test_published_credit_counts_ties_as_half_unless_scores_are_equal():
    s0, s1 = torch.tensor([2.0, 0.0, 1.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 0.0, 4.0])
    l0 = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5])
    assert published_pair_credit(s0, s1, l0, 1 - l0).tolist() == [1.0, 0.0, 0.0, 0.5, 0.0]


def test_pickscore_labels_threshold_on_the_softmax_gap():
    # softmax gaps: σ(d) − σ(−d) = tanh(d/2): d = 0.1 -> 0.05 (tie), d = 1 -> 0.46 (win)
    s0, s1 = torch.tensor([1.0, 0.1, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.1, 1.0])
    label_0, label_1 = pickscore_labels(s0, s1, threshold=0.1)
    assert label_0.tolist() == [1.0, 0.5, 0.5, 0.0]
    assert (label_0 + label_1).tolist() == [1.0] * 4


# ----------------------------------------------------------------------------------------------------
# optimisation


def test_warmup_is_deepspeeds_log_warmup_then_linear_decay():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = warmup_decay_schedule(optimizer, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    # DeepSpeed 0.12.3 WarmupDecayLR (log) as published: step 0 at the optimizer's own LR, step s >= 1 at
    # gamma(s - 1), gamma(i) = ln(i+1)/ln(4) while i < 4, then (12 - i) / (12 - 4)
    log4 = math.log(4)
    expected = [1.0, 0.0, math.log(2) / log4, math.log(3) / log4, 1.0, 8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8]
    assert lrs == pytest.approx(expected)


def test_gradient_clipping_actually_applies():
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    schedule = warmup_decay_schedule(optimizer, 0, 10)
    param.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    norm = optimizer_step([param], optimizer, schedule, max_grad_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert param.detach().norm().item() == pytest.approx(0.1 * 1.0)  # the step used the clipped gradient
    assert param.grad is None


def test_optimizer_decays_every_parameter_as_published():
    model = torch.nn.Linear(3, 2)
    groups = make_optimizer(model, 1e-3, 0.3).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.3)]


def test_batch_indices_cover_each_epoch_once():
    gen = torch.Generator().manual_seed(0)
    batches = batch_indices(list(range(10, 20)), 3, gen)
    epoch = [i for _ in range(3) for i in next(batches)]
    assert len(set(epoch)) == 9 and set(epoch) <= set(range(10, 20))


# ----------------------------------------------------------------------------------------------------
# x̂0 inputs and the training phases on tiny real models


def write_shards(pairs_dir: Path, frame, split: str = TRAIN_SPLIT, rows_per_shard: int = 25) -> None:
    """The prepared layout's shards (two for 40 rows: the reader crosses a shard boundary)."""
    pairs_dir.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(frame), rows_per_shard)):
        frame.iloc[start:start + rows_per_shard].to_parquet(pairs_dir / shard_name(split, k), index=False)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    """A prepared dir (spo.data.prepared_layout): models/base_model (tiny SD), models/preference_backbone
    (tiny CLIP), pairs/train-0000{0,1}.parquet (40 pairs)."""
    root = tmp_path_factory.mktemp("prepared")
    build_tiny_sd(root / BASE_MODEL_DIR)
    build_tiny_clip(root / BACKBONE_DIR)
    write_shards(root / PAIRS_DIR, good_pairs_frame(40))
    return root


@pytest.fixture
def model(tiny_world):
    return load_diffusion_model(str(tiny_world / BASE_MODEL_DIR))


@pytest.fixture
def spm(tiny_world):
    return StepAwarePreferenceModel.from_backbone(str(tiny_world / BACKBONE_DIR))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def x0_pair(model, images_0, images_1, t, seed=0):
    return noisy_x0_images(model, images_0, images_1, PROMPTS[:len(t)], t, 5.0, torch.Generator().manual_seed(seed))


def test_identical_images_get_identical_predictions(model):
    """Both images of a pair get the same noise: identical images in -> identical x̂0 out."""
    x = images(4, 0)
    t = torch.tensor([0, 300, 700, 999])
    out_0, out_1 = x0_pair(model, x, x.clone(), t)
    assert out_0.shape == (4, 3, 16, 16) and torch.equal(out_0, out_1)
    # a different partner leaves the row's noise unchanged only in the shared-noise design
    other_0, other_1 = x0_pair(model, x, images(4, 1), t)
    assert torch.equal(other_0, out_0)
    assert not torch.equal(other_1, out_1)
    assert out_0.min() >= -1 and out_0.max() <= 1


def test_predictions_are_seeded_and_near_clean_at_t0(model):
    x = images(2, 3)
    a = x0_pair(model, x, x, torch.tensor([500, 500]), seed=7)[0]
    b = x0_pair(model, x, x, torch.tensor([500, 500]), seed=7)[0]
    c = x0_pair(model, x, x, torch.tensor([500, 500]), seed=8)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # With ε̂ ≡ 0 (zeroed UNet output), a near-deterministic VAE posterior and unit-scale latents (as
    # for a trained SD VAE), x̂0 = D(z + sqrt((1−ᾱ_t)/ᾱ_t)·ε): the clean reconstruction at t = 0
    # (factor 0.03), ever noisier up to t = 999 (factor 14.6).
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.zero_()
        model.vae.quant_conv.bias[model.vae.config.latent_channels:] = -30.0  # log-variance channels
        mean = model.vae.encode(x).latent_dist.mean
        model.vae.register_to_config(scaling_factor=float(1 / mean.std()))
    recon = model.decode_latents(mean * model.vae.config.scaling_factor)
    error = [(x0_pair(model, x, x, torch.tensor([t, t]))[0] - recon).abs().mean().item() for t in (0, 250, 999)]
    assert error[0] < 0.1 * error[2] and error[0] < error[1] < error[2]


def load_pairs(tiny_world):
    pairs = TrainingPairs(PairsSpec(str(tiny_world / PAIRS_DIR), None, seed=0))
    return pair_loader(pairs, 16), list(range(len(pairs)))


def clip_state(spm):
    return {k: v.clone() for k, v in spm.clip.state_dict().items()}


def test_preference_phase_trains_only_the_backbone_and_keeps_identity(spm, tiny_world):
    load_batch, indices = load_pairs(tiny_world)
    before, time_before = clip_state(spm), [p.clone() for p in spm.time_conditioning_parameters()]
    tracker = MemoryTracker()
    losses = train_preference_backbone(spm, load_batch, indices, CFG, tracker=tracker,
                                       generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    changed = [k for k, v in clip_state(spm).items() if not torch.equal(v, before[k])]
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
    assert all(torch.equal(a, b) for a, b in zip(spm.time_conditioning_parameters(), time_before))
    assert [s for s, _ in tracker.metrics["preference/loss"]] == [1, 2, 3]
    batch = load_batch(indices[:4])
    with torch.no_grad():  # still exactly the (fine-tuned) backbone at every t
        text = spm.encode_text(batch.prompts)
        assert torch.equal(spm.score(batch.images_0, text, torch.tensor([0, 250, 600, 999])),
                           spm.backbone_score(batch.images_0, batch.prompts))


def test_spm_phase_updates_every_part_and_logs_each_step(spm, model, tiny_world):
    load_batch, indices = load_pairs(tiny_world)
    before, time_before = clip_state(spm), [p.clone() for p in spm.time_conditioning_parameters()]
    tracker = MemoryTracker()
    jobs = plan_training_jobs(indices, CFG.max_steps, CFG.batch_size, 1000, seed=0)
    losses = train_spm(spm, load_batch, jobs, in_process_source(model, load_batch, 5.0), CFG, tracker=tracker)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = clip_state(spm)
    assert sum(not torch.equal(v, before[k]) for k, v in after.items()) > 0.9 * len(before) - 2
    moved = [not torch.equal(a, b) for a, b in zip(spm.time_conditioning_parameters(), time_before)]
    assert all(moved)  # t-embedder, every block's adaLN and the pooled modulation
    assert [s for s, _ in tracker.metrics["spm/loss"]] == [1, 2, 3]
    assert all(v <= CFG.learning_rate for _, v in tracker.metrics["spm/lr"])


def test_pickscore_relabelling_uses_the_frozen_backbone_on_clean_images(spm, tiny_world):
    load_batch, indices = load_pairs(tiny_world)
    with torch.no_grad():
        spm.clip.logit_scale.fill_(5.0)  # exp(5) ≈ 148: a random tiny CLIP then gives decisive gaps
    relabelled = relabelled_by_backbone(load_batch, frozen_copy(spm), threshold=0.1)(indices[:12])
    original = load_batch(indices[:12])
    with torch.no_grad():
        expected = pickscore_labels(spm.backbone_score(original.images_0, original.prompts),
                                    spm.backbone_score(original.images_1, original.prompts), 0.1)
    assert torch.equal(relabelled.label_0, expected[0]) and torch.equal(relabelled.label_1, expected[1])
    assert set(relabelled.label_0.tolist()) - {0.5}  # some decisive labels
    assert torch.equal(relabelled.images_0, original.images_0) and relabelled.prompts == original.prompts


def test_evaluation_is_repeatable(spm, model, tiny_world):
    load_batch, indices = load_pairs(tiny_world)
    perturb_time_conditioning(spm)
    jobs = plan_eval_jobs(indices[:16], (0, 501, 951), batch_size=8, seed=3)
    assert jobs == plan_eval_jobs(indices[:16], (0, 501, 951), batch_size=8, seed=3) and len(jobs) == 6
    first = evaluate_accuracy(spm, load_batch, jobs, in_process_source(model, load_batch, 5.0))
    again = evaluate_accuracy(spm, load_batch, jobs, in_process_source(model, load_batch, 5.0))
    assert first == again and set(first) == {0, 501, 951}
    assert all(0.0 <= v <= 1.0 for v in first.values())


def test_training_jobs_are_seeded_batches_with_one_timestep_per_pair():
    jobs = plan_training_jobs(list(range(10)), steps=7, batch_size=4, num_train_timesteps=1000, seed=1)
    assert jobs == plan_training_jobs(list(range(10)), 7, 4, 1000, seed=1)
    assert jobs != plan_training_jobs(list(range(10)), 7, 4, 1000, seed=2)
    assert [len(j.indices) for j in jobs] == [4] * 7 and all(len(j.timesteps) == 4 for j in jobs)
    assert all(0 <= t < 1000 for j in jobs for t in j.timesteps) and len({j.seed for j in jobs}) == 7
    first_epoch = sorted(i for j in jobs[:2] for i in j.indices)  # 2 full batches per epoch of 10 pairs
    assert len(set(first_epoch)) == 8


@pytest.mark.slow
def test_worker_x0_equals_in_process_x0(model, tiny_world):
    """The prefetching worker (one thread) computes exactly what this process does on one thread."""
    load_batch, indices = load_pairs(tiny_world)
    jobs = plan_eval_jobs(indices[:8], (0, 501), batch_size=4, seed=3)
    spec = X0WorkerSpec(str(tiny_world / BASE_MODEL_DIR), None, PairsSpec(str(tiny_world / PAIRS_DIR), None, 0), 16, 5.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = [in_process_source(model, load_batch, 5.0)(job) for job in jobs]
        with prefetched_source(spec, jobs) as source:
            there = [source(job) for job in jobs]
            again = source(jobs[0])  # eval jobs serve before and after training
            with pytest.raises(KeyError, match="not planned"):
                source(plan_eval_jobs(indices[:8], (999,), batch_size=4, seed=3)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(here, there) for k in (0, 1))
    assert torch.equal(again[0], there[0][0])


# ----------------------------------------------------------------------------------------------------
# the stage


def validated(root: Path, quarantined: list[tuple[str, int]] = ()) -> Path:
    """A validate output dir whose quarantine.parquet names `quarantined` (shard, row) train rows."""
    out = root / "validate"
    out.mkdir(parents=True, exist_ok=True)
    schema = quarantine_schema(pa.schema([]))
    table = pa.table({"shard": [s for s, _ in quarantined], "row": [r for _, r in quarantined],
                      "split": [TRAIN_SPLIT] * len(quarantined), "reasons": ["test"] * len(quarantined),
                      "detail": [""] * len(quarantined)}, schema=schema)
    pq.write_table(table, out / QUARANTINE_FILE)
    return out


def stage_config(**train_spm):
    overrides = {"preference_steps": 2, "max_steps": 3, "warmup_steps": 1, "batch_size": 4,
                 "eval_timesteps": [0, 951], **train_spm}
    return load_profile("digits", [f"train_spm.{k}={json.dumps(v)}" for k, v in overrides.items()])


@pytest.mark.slow
def test_stage_writes_a_trained_spm_and_metrics(tiny_world, tmp_path):
    out = tmp_path / "spm"
    metrics = stage.run(stage_config(), prepared_dir=tiny_world, out_dir=out, tracker=MemoryTracker())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("accuracy_t0", "accuracy_t951", "initial_accuracy_t0", "initial_accuracy_t951",
                "backbone_accuracy_clean", "backbone_accuracy_clean_initial", "accuracy_clean_t0",
                "accuracy_clean_t0_published", "initial_accuracy_clean_t0", "initial_accuracy_clean_t0_published"):
        assert 0.0 <= saved[key] <= 1.0, key
    # at init the SPM is its backbone: clean t = 0 accuracy (ties excluded) is the backbone's
    assert saved["initial_accuracy_clean_t0"] == saved["backbone_accuracy_clean_initial"]
    assert math.isfinite(saved["final_loss"]) and saved["num_eval_pairs"] == 4 and saved["num_train_pairs"] == 36
    trained = StepAwarePreferenceModel.from_pretrained(out / "model")
    backbone = StepAwarePreferenceModel.from_backbone(str(tiny_world / BACKBONE_DIR))
    changed = [k for k, v in trained.clip.state_dict().items() if not torch.equal(v, backbone.clip.state_dict()[k])]
    assert len(changed) > 10
    assert any(not torch.equal(a, b) for a, b in zip(trained.time_conditioning_parameters(),
                                                      backbone.time_conditioning_parameters()))
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".spm.tmp-", ".spm.old-"))]  # no temp dirs left


@pytest.mark.slow
def test_stage_skips_quarantined_rows_and_clears_its_checkpoints(tiny_world, tmp_path):
    validate_dir = validated(tmp_path, [(shard_name(TRAIN_SPLIT, 0), 3), (shard_name(TRAIN_SPLIT, 1), 0)])
    checkpoints = tmp_path / "checkpoints"
    metrics = stage.run(stage_config(checkpoint_every=1, preference_steps=0), prepared_dir=tiny_world,
                        validate_dir=validate_dir, out_dir=tmp_path / "spm", checkpoint_dir=checkpoints,
                        tracker=MemoryTracker())
    assert metrics["num_train_pairs"] + metrics["num_eval_pairs"] == 38  # 40 less the 2 quarantined
    assert checkpoints.is_dir() and not list(checkpoints.glob("*.pt"))  # written during the run, then cleared
    with pytest.raises(FileNotFoundError, match="run the validate stage"):
        stage.run(stage_config(), prepared_dir=tiny_world, validate_dir=tmp_path / "nowhere",
                  out_dir=tmp_path / "spm2", tracker=MemoryTracker())


@pytest.mark.slow
def test_stage_with_pickscore_labels(tiny_world, tmp_path):
    metrics = stage.run(stage_config(use_pickscore_labels=True, preference_steps=0, max_steps=2),
                        prepared_dir=tiny_world, out_dir=tmp_path / "spm", tracker=MemoryTracker())
    assert metrics["backbone_accuracy_clean"] == metrics["backbone_accuracy_clean_initial"]
    assert (tmp_path / "spm" / "model" / "spm.json").is_file()


def broken_world(tiny_world: Path, tmp_path: Path, frame) -> Path:
    root = tmp_path / "prepared"
    root.mkdir()
    (root / MODELS_DIR).symlink_to(tiny_world / MODELS_DIR)
    write_shards(root / PAIRS_DIR, frame)
    return root


@pytest.mark.parametrize("breakage,message", [
    (lambda f: f.drop(columns=["label_1"]), "label_1"),
    (lambda f: f.assign(label_0=[np.nan] + list(f.label_0[1:])), "label_0"),
    (lambda f: f.assign(caption=[" "] + list(f.caption[1:])), "caption"),
    (lambda f: f.assign(jpg_1=[b"not a jpeg"] * len(f)), "jpg_1"),
])
def test_bad_pairs_are_named_and_nothing_is_written(tiny_world, tmp_path, breakage, message):
    prepared = broken_world(tiny_world, tmp_path, breakage(good_pairs_frame(12)))
    out = tmp_path / "spm"
    with pytest.raises((ValueError, KeyError), match=message):
        stage.run(stage_config(), prepared_dir=prepared, out_dir=out, tracker=MemoryTracker())
    assert not out.exists()


@pytest.mark.slow
def test_main_runs_from_the_command_line(tiny_world, tmp_path, monkeypatch, mlflow_db):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train_spm"].update(preference_steps=1, max_steps=1, warmup_steps=1, batch_size=4, eval_timesteps=[0])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    stage.main(["--prepared-dir", str(tiny_world), "--out-dir", str(tmp_path / "models" / "spm"),
                "--validate-dir", str(validated(tmp_path)), "--checkpoint-dir", str(tmp_path / "checkpoints")])
    assert (tmp_path / "models" / "spm" / "metrics.json").is_file()


def test_split_is_seeded_and_disjoint():
    train, held = holdout_split(100, seed=1)
    assert len(held) == 10 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert holdout_split(100, seed=1) == (train, held)
    assert len(holdout_split(50_000, seed=1)[1]) == MAX_EVAL_PAIRS


def test_prefetch_is_only_for_inputs_that_fit_in_memory():
    jobs = plan_eval_jobs(list(range(100)), (0, 251, 501, 701, 951), batch_size=16, seed=0)
    assert stage.prefetch_bytes(jobs, 16) == 500 * 2 * 3 * 16 * 16 * 4  # digits: 1.5 MB of eval inputs
    real = plan_training_jobs(list(range(1000)), 8000, 16, 1000, seed=0)  # the SD1.5 recipe at 512 px
    assert stage.prefetch_bytes(real, 512) > stage.MAX_PREFETCH_BYTES
