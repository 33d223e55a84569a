"""Register a tiny real LoRA in a throwaway MLflow registry: the diffusers flavour, and the champion gate."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from spo.config import load_profile
from spo.data.prepared_layout import BASE_MODEL_DIR
from spo.stages import register
from spo.tracking.mlflow_tracker import stage_tracker

NAME = "spo-test-lora"
CFG = load_profile("digits", [f"register.model_name={NAME}", "tracking.experiment=spo-test",
                              "evaluate.bootstrap_resamples=500",
                              "evaluate.models=[{name: base}, {name: spo, run_output: spo}]"])
BOTH = load_profile("digits", [f"register.model_name={NAME}", "tracking.experiment=spo-test",
                               "evaluate.bootstrap_resamples=500"])  # the default models: base, spo, dpo
PROMPTS = 30


def write_eval(eval_dir, shift: float, fingerprint: str = "fp-a", seed: int = 0, dpo_shift: float | None = None):
    """An evaluation output whose `spo` rows score base + `shift` (+ noise) on oracle_utility (and `dpo`
    rows base + `dpo_shift`, if given)."""
    base = np.random.default_rng(0).normal(size=PROMPTS)  # the same base images every run
    noise = 0.1 * np.random.default_rng(seed + 1).normal(size=PROMPTS)
    rows = []
    models = [("base", base), ("spo", base + shift + noise)]
    if dpo_shift is not None:
        models.append(("dpo", base + dpo_shift + noise))
    for model, values in models:
        rows += [{"model": model, "prompt_index": i, "prompt": f"p{i}", "seed": 0, "oracle_utility": float(v),
                  "oracle_aesthetic": 0.0} for i, v in enumerate(values)]
    eval_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(eval_dir / "scores.parquet", index=False)
    (eval_dir / "protocol.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (eval_dir / "metrics.json").write_text(json.dumps({"models": {"spo": {"oracle_utility": shift}}, "note": "x"}))
    return eval_dir


@pytest.fixture
def stage_dirs(tmp_path, tiny_lora):
    base, lora_dir = tiny_lora
    prepared = tmp_path / "prepared"
    (prepared / "models").mkdir(parents=True)
    (prepared / BASE_MODEL_DIR).symlink_to(base, target_is_directory=True)
    return prepared, lora_dir.parent


def register_once(tmp_path, stage_dirs, eval_dir, cfg=CFG, dpo_dir=None):
    """registration.json with the SPO model's entry merged in (its version, gate, ...; the top level's
    champion_version is the champion after every candidate)."""
    prepared, spo_dir = stage_dirs
    out = tmp_path / f"registered-{eval_dir.name}"
    with stage_tracker("register", cfg) as tracker:
        register.run(cfg, prepared_dir=prepared, spo_dir=spo_dir, eval_dir=eval_dir, out_dir=out, tracker=tracker,
                     dpo_dir=dpo_dir)
    registration = json.loads((out / "registration.json").read_text())
    return {**registration["registered"].get("spo", {}), **registration}


LOAD_WITHOUT_SPO = """
import sys
sys.modules["spo"] = None  # the registered model must not need this package
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
pipe = model.get_raw_model()
lora_b = sum(float(p.abs().sum()) for n, p in pipe.unet.named_parameters() if "lora_B" in n)
pngs = model.predict(pd.DataFrame({"prompt": ["one", "two"]}), params={"num_inference_steps": 2})
print(type(pipe).__name__, len(pngs), all(png[:4] == b"\\x89PNG" for png in pngs), lora_b > 0)
"""


@pytest.mark.slow  # a fresh interpreter loads the registered model (~15 s)
def test_register_logs_the_diffusers_flavour_which_loads_without_this_package(mlflow_db, tmp_path, stage_dirs):
    info = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "eval", shift=1.0))
    assert info["version"] == "1" and info["alias_uri"] == f"models:/{NAME}@candidate-spo"
    assert info["gate"]["reason"] == "first" and info["champion_version"] == "1"
    assert info["eval_metrics"] == {"models.spo.oracle_utility": 1.0}

    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == str(client.get_model_version_by_alias(NAME, "candidate-spo").version) == "1"
    assert version.tags["base_model"] == str((stage_dirs[0] / BASE_MODEL_DIR).resolve())
    assert version.tags["gate.reason"] == "first" and version.tags["eval.protocol_fingerprint"] == "fp-a"
    model_info = mlflow.models.get_model_info(info["logged_model_uri"])
    assert set(model_info.flavors) == {"diffusers", "python_function"}
    assert model_info.flavors["python_function"]["loader_module"] == "mlflow.diffusers"  # nothing pickled
    assert [p["name"] for p in model_info.signature.params.to_dict()][:2] == ["num_inference_steps", "guidance_scale"]
    run = client.get_run(info["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == info["parent_run_id"]

    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SPO, f"models:/{NAME}@champion"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-4:] == ["StableDiffusionPipeline", "2", "True", "True"]


def test_gate_moves_champion_only_for_a_better_candidate(mlflow_db, tmp_path, stage_dirs):
    first = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e1", shift=0.0))
    assert first["gate"]["reason"] == "first" and first["champion_version"] == "1"

    # v2 scores below v1's candidate on every prompt: it stays a candidate
    worse = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e2", shift=-0.5))
    assert worse["gate"]["reason"] == "not_better" and worse["gate"]["win_rate"] < 0.5
    assert worse["champion_version"] == "1"
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "candidate-spo").version) == "2"

    # v3 beats the champion (v1) on every prompt: the CI clears 0.5, the alias moves
    better = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e3", shift=0.5))
    assert better["gate"]["reason"] == "better" and better["gate"]["champion_version"] == "1"
    assert better["gate"]["win_rate"] == 1.0 and better["gate"]["ci_low"] > 0.5
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    tags = client.get_model_version(NAME, "3").tags
    assert tags["gate.reason"] == "better" and float(tags["gate.win_rate"]) == 1.0

    # scored under another protocol: not comparable, the champion stays
    other = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e4", shift=5.0, fingerprint="fp-b"))
    assert other["gate"]["reason"] == "protocol_differs" and other["champion_version"] == "3"


def test_both_methods_are_registered_and_gated_in_turn(mlflow_db, tmp_path, stage_dirs):
    """SPO and DPO become versions of one registered model; DPO, better than the SPO just promoted, takes
    the champion alias from it. A disabled DPO is skipped and said so."""
    registration = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e1", shift=0.0, dpo_shift=0.5),
                                 cfg=BOTH, dpo_dir=stage_dirs[1])
    spo, dpo = registration["registered"]["spo"], registration["registered"]["dpo"]
    assert (spo["version"], spo["gate"]["reason"]) == ("1", "first")
    assert (dpo["version"], dpo["gate"]["reason"], dpo["gate"]["champion_version"]) == ("2", "better", "1")
    assert registration["champion_version"] == "2" and registration["skipped"] == {}
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "candidate-dpo").version) == "2"
    assert client.get_model_version(NAME, "1").tags["method"] == "spo"
    assert client.get_model_version(NAME, "2").tags["method"] == "dpo"

    disabled = tmp_path / "dpo-off"
    (disabled / "lora").mkdir(parents=True)
    (disabled / "lora" / "disabled.json").write_text("{}")
    again = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e2", shift=0.0), cfg=BOTH, dpo_dir=disabled)
    assert set(again["registered"]) == {"spo"} and "dpo" in again["skipped"]
    assert again["gate"]["reason"] == "not_better" and again["champion_version"] == "2"  # SPO v3 vs DPO v2


def test_gate_needs_the_ci_above_half_not_only_the_rate(mlflow_db, tmp_path, stage_dirs):
    register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e1", shift=0.0))
    # a tiny improvement drowned in noise: the rate may exceed 0.5, the CI's lower end does not
    noisy = register_once(tmp_path, stage_dirs, write_eval(tmp_path / "e2", shift=0.02, seed=1))
    assert noisy["gate"]["win_rate"] > 0.5 > noisy["gate"]["ci_low"] and noisy["gate"]["reason"] == "not_better"


def test_missing_lora_names_the_file(mlflow_db, tmp_path, stage_dirs):
    prepared, _ = stage_dirs
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        register.run(CFG, prepared_dir=prepared, spo_dir=tmp_path / "nowhere", eval_dir=write_eval(tmp_path / "e", 0),
                     out_dir=tmp_path / "registered", tracker=None)
    assert not (tmp_path / "registered").exists()


def test_missing_eval_metrics_names_the_file(mlflow_db, tmp_path, stage_dirs):
    prepared, spo_dir = stage_dirs
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        register.run(CFG, prepared_dir=prepared, spo_dir=spo_dir, eval_dir=tmp_path / "no-eval",
                     out_dir=tmp_path / "registered", tracker=None)


def test_primary_metric_must_be_evaluated(mlflow_db, tmp_path, stage_dirs):
    prepared, spo_dir = stage_dirs
    cfg = load_profile("digits", ["register.primary_metric=spm_reward"])
    with pytest.raises(ValueError, match="register.primary_metric: spm_reward is not among"):
        register.run(cfg, prepared_dir=prepared, spo_dir=spo_dir, eval_dir=write_eval(tmp_path / "e", 0),
                     out_dir=tmp_path / "registered", tracker=None)
