"""The real profiles run the DVC pipeline on stand-ins of the real architectures (`spo fixtures build`): sd15 the
whole of it -- prepare -> validate -> train_spm -> train_spo, train_dpo -> evaluate (the five published scorers) ->
register -- and sdxl through train_spo (MSPO) and train_dpo; exactly what a user does for a dry run, with the
printed command."""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys

import pyarrow.parquet as pq
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from test_dvc_pipeline import copy_repo, sh, stages_run

from spo.cli import main as spo_main
from spo.config import load_config
from spo.data.prepared_layout import EVAL_SPLIT, PAIRS_DIR, TRAIN_SPLIT, split_shards
from spo.data.quarantine import read_quarantine
from spo.models.step_aware_preference_model import StepAwarePreferenceModel


def fresh_repo(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = {"PATH": f"{sys.prefix}/bin:/usr/bin:/bin", "HOME": str(tmp_path), "DVC_NO_ANALYTICS": "1",
           "GX_ANALYTICS_ENABLED": "false", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        sh(args, repo, env)
    return repo, env


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["sd15", "sdxl"])
def test_profile_runs_the_whole_pipeline_on_the_standins(profile, tmp_path, capsys):
    repo, env = fresh_repo(tmp_path)
    # the `spo` command in this process (two fresh interpreters would only add their imports)
    assert spo_main(["fixtures", "build", str(tmp_path / "standins"), "--profile", profile]) == 0
    printed = capsys.readouterr().out
    command = next(line for line in printed.splitlines() if line.startswith(f"spo profile use {profile} "))
    use, repro = command.split(" && ")
    assert repro == "dvc repro"
    if profile == "sdxl":  # sdxl trains with the opt-in speed options as printed (sd15: as published)
        fast = next(line for line in printed.splitlines() if line.startswith("# opt-in fast scoring"))
        use += " " + fast.split("add: ")[1] + " -S train_spo.channels_last=true -S train_spo.decode_batch_size=1"
    assert spo_main([*shlex.split(use)[1:], "--params", str(repo / "params.yaml")]) == 0
    cfg = load_config(repo / "params.yaml")
    assert cfg.profile == profile and cfg.model.base_model == str(tmp_path / "standins" / profile)
    fast = (str(tmp_path / "standins" / "taesd"), True, 1) if profile == "sdxl" else (None, False, None)
    assert (cfg.train_spo.scoring_decoder, cfg.train_spo.channels_last, cfg.train_spo.decode_batch_size) == fast

    assert stages_run(sh(["dvc", "repro", "train_spm"], repo, env)) == ["prepare", "validate", "train_spm"]
    # sd15's SPO trains data parallel: SPO_NUM_PROCESSES=2 relaunches the stage under accelerate (gloo on
    # the CPU); tests/test_spo_resume_and_processes.py shows 2 processes take 1 process's steps
    processes = 2 if profile == "sd15" else 1
    out = sh(["dvc", "repro", "train_spo"], repo, {**env, "SPO_NUM_PROCESSES": str(processes)})
    assert stages_run(out) == ["train_spo"]

    pairs = repo / "data/prepared" / PAIRS_DIR
    train, held_out = split_shards(pairs, TRAIN_SPLIT), split_shards(pairs, EVAL_SPLIT)
    prepared = json.loads((repo / "data/prepared/metrics.json").read_text())
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in train) == prepared["kept"] > 0
    assert len(train) == -(-prepared["kept"] // cfg.prepare.rows_per_shard) and len(held_out) == 1
    assert len(read_quarantine(repo / "reports/validate", columns=["shard"])) == 0
    metrics = json.loads((repo / "models/spm/metrics.json").read_text())
    assert metrics["num_train_pairs"] == prepared["kept"] and metrics["num_eval_pairs"] == prepared["eval_rows"]
    for t in cfg.train_spm.eval_timesteps:
        assert 0 <= metrics[f"accuracy_t{t}"] <= 1
    spm = StepAwarePreferenceModel.from_pretrained(repo / "models/spm/model")
    assert spm.clip.config.vision_config.image_size == 224  # the PickScore stand-in's real input size
    assert not list((repo / "models/spm_checkpoints").glob("*.pt"))  # cleared once the model was written

    # SPO (SDXL: MSPO): 1 round of 2 prompts, every comparison kept (threshold 0 on the stand-ins)
    spo = json.loads((repo / "models/spo/metrics.json").read_text())
    transitions = 16  # 20 steps, branching from step 4: 16 transitions per prompt for SD1.5 and MSPO alike
    assert spo["rounds"] == 1 and spo["optimizer_steps"] == 2 * transitions / cfg.train_spo.pairs_per_step
    assert spo["num_processes"] == processes
    history = list(csv.DictReader((repo / "models/spo/history.csv").open()))
    assert len(history) == spo["optimizer_steps"] and all(0 <= float(h["clip_fraction"]) <= 1 for h in history)
    assert not list((repo / "models/spo_checkpoints").glob("*.pt"))  # none after the last round, or left behind
    pipe_class = StableDiffusionPipeline if profile == "sd15" else StableDiffusionXLPipeline
    pipe = pipe_class.from_pretrained(cfg.model.base_model)
    pipe.load_lora_weights(str(repo / "models/spo/lora"))  # what a user does with our output
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())

    curve = list(csv.DictReader((repo / "models/spo/curve.csv").open()))  # before and after the one round
    assert [float(r["position"]) for r in curve] == [0, 1] and all(math.isfinite(float(r["pickscore"])) for r in curve)

    # Diffusion-DPO on the same pairs: the sd15 recipe's full fine-tune (2 processes), SDXL's LoRA
    out = sh(["dvc", "repro", "train_dpo"], repo, {**env, "SPO_NUM_PROCESSES": str(processes)})
    assert stages_run(out) == ["train_dpo"]
    dpo = json.loads((repo / "models/dpo/metrics.json").read_text())
    assert dpo["optimizer_steps"] == 2 and dpo["num_processes"] == processes
    assert dpo["decided_pairs"] + dpo["ties_dropped"] == prepared["kept"] and dpo["pairs_seen"] == 8
    dpo_history = list(csv.DictReader((repo / "models/dpo/history.csv").open()))
    assert float(dpo_history[0]["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert len(list(csv.DictReader((repo / "models/dpo/curve.csv").open()))) == 2
    assert not list((repo / "models/dpo_checkpoints").glob("*.pt"))
    if profile == "sdxl":  # evaluate samples with the SDXL conditioning train_spo just used (the suite time bar)
        assert cfg.train_dpo.full_finetune is False
        pipe.load_lora_weights(str(repo / "models/dpo/lora"), adapter_name="dpo")
        assert stages_run(sh(["dvc", "repro", "train_spo", "train_dpo"], repo, env)) == []
        return
    assert cfg.train_dpo.full_finetune and (repo / "models/dpo/lora/unet/config.json").is_file()
    # evaluate with the published scorers' stand-ins (their real classes, key layouts and preprocessing),
    # then register: the first version becomes champion
    assert stages_run(sh(["dvc", "repro"], repo, env)) == ["evaluate", "register"]
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    scorers = ["pickscore", "hpsv21", "imagereward", "aesthetic", "clip_score"]
    assert [s.name for s in cfg.evaluate.scorers] == scorers
    for model in ("base", "spo", "dpo"):
        assert all(math.isfinite(evaluation["models"][model][k]) for k in scorers)
    assert evaluation["num_samples"] == cfg.evaluate.num_prompts
    assert 0 <= evaluation["win_rate"]["spo_vs_base"]["pickscore"] <= 1
    assert 'data-model="spo"' in (repo / "reports/evaluate/report.html").read_text()
    registration = json.loads((repo / "models/registered/registration.json").read_text())
    assert registration["registered"]["spo"]["gate"]["reason"] == "first"
    assert registration["registered"]["spo"]["version"] == "1"
    assert "full UNet" in registration["skipped"]["dpo"]  # the flavour takes adapters; the DPO UNet is exported
    assert stages_run(sh(["dvc", "repro"], repo, env)) == []
