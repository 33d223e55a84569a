"""Register a tiny real LoRA in a throwaway MLflow registry and load it back through the alias."""

import json

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from spo.config import load_profile
from spo.data.prepared_layout import BASE_MODEL_DIR
from spo.stages import register
from spo.tracking.mlflow_tracker import stage_tracker

CFG = load_profile("digits", ["register.model_name=spo-test-lora", "register.alias=candidate",
                              "tracking.experiment=spo-test"])


@pytest.fixture
def stage_dirs(tmp_path, tiny_lora):
    base, lora_dir = tiny_lora
    prepared = tmp_path / "prepared"
    (prepared / "models").mkdir(parents=True)
    (prepared / BASE_MODEL_DIR).symlink_to(base, target_is_directory=True)
    eval_dir = tmp_path / "evaluate"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps({"spo": {"aesthetic": 0.75, "alignment": 0.9},
                                                       "win_rate": 0.6, "note": "text is skipped"}))
    return prepared, lora_dir.parent, eval_dir


def test_register_logs_aliases_and_loads_back(mlflow_db, tmp_path, stage_dirs, tiny_lora):
    prepared, spo_dir, eval_dir = stage_dirs
    with stage_tracker("register", CFG) as tracker:
        summary = register.run(CFG, prepared_dir=prepared, spo_dir=spo_dir, eval_dir=eval_dir,
                               out_dir=tmp_path / "registered", tracker=tracker)
    info = json.loads((tmp_path / "registered" / "registration.json").read_text())
    assert summary == {"registered_version": 1.0}
    assert info["version"] == "1" and info["alias_uri"] == "models:/spo-test-lora@candidate"
    assert info["eval_metrics"] == {"spo.aesthetic": 0.75, "spo.alignment": 0.9, "win_rate": 0.6}

    client = MlflowClient()
    version = client.get_model_version_by_alias("spo-test-lora", "candidate")
    assert str(version.version) == "1" and version.tags["metric.spo.aesthetic"] == "0.75"
    assert version.tags["base_model"] == str(prepared / BASE_MODEL_DIR)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == info["parent_run_id"]
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"  # register ends the pipeline run

    model = mlflow.pyfunc.load_model("models:/spo-test-lora@candidate")
    pipe = model.unwrap_python_model().pipe
    saved = load_file(str(spo_dir / "lora" / "pytorch_lora_weights.safetensors"))
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert len(loaded) == len([k for k in saved if "lora_B" in k or "lora.up" in k]) > 0
    a_saved = next(v for k, v in saved.items() if k.endswith("to_q.lora_B.weight") or k.endswith("to_q.lora.up.weight"))
    assert any(torch.equal(p.data, a_saved) for p in loaded.values())  # the adapter itself, not a fresh one

    out = model.predict(pd.DataFrame({"prompt": ["one", "two"], "seed": [0, 0]}),
                        params={"num_inference_steps": 2})
    assert list(out["prompt"]) == ["one", "two"] and all(png[:4] == b"\x89PNG" for png in out["image_png"])


def test_missing_lora_names_the_file(mlflow_db, tmp_path, stage_dirs):
    prepared, _, eval_dir = stage_dirs
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        register.run(CFG, prepared_dir=prepared, spo_dir=tmp_path / "nowhere", eval_dir=eval_dir,
                     out_dir=tmp_path / "registered", tracker=None)
    assert not (tmp_path / "registered").exists()


def test_missing_eval_metrics_names_the_file(mlflow_db, tmp_path, stage_dirs):
    prepared, spo_dir, _ = stage_dirs
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        register.run(CFG, prepared_dir=prepared, spo_dir=spo_dir, eval_dir=tmp_path / "no-eval",
                     out_dir=tmp_path / "registered", tracker=None)
