"""A retried KFP training task resumes: the train_dpo component runs under kfp.local, its process is
killed (SIGKILL, as a preempted node does) after a checkpoint, and the rerun with the same KFP run id and
checkpoint root (the PVC on a cluster) continues from that checkpoint and ends with the LoRA an
uninterrupted run ends with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO_ROOT, good_pairs_frame, tiny_digits_params
from safetensors.torch import load_file
from test_train_spm import write_shards
from tiny_models import build_tiny_sd

from spo.data.prepared_layout import BASE_MODEL_DIR, PAIRS_DIR
from spo.data.quarantine import META_FIELDS, QUARANTINE_FILE
from spo.models.lora import LORA_WEIGHTS_FILE

pytest.importorskip("kfp")
pytestmark = pytest.mark.slow

STEPS = 120

PIPELINE = textwrap.dedent('''
    """One train_dpo task on imported inputs, under kfp.local (what `spo pipeline run-local` uses)."""
    import sys
    from pathlib import Path

    from kfp import dsl, local
    from kfp.dsl import Artifact, Dataset

    from components.stages import build_components

    prepared, validation, stage_params, root = sys.argv[1:5]
    train_dpo = build_components("unused-locally")["train_dpo"]


    @dsl.pipeline
    def retry():
        data = dsl.importer(artifact_uri=prepared, artifact_class=Dataset)
        report = dsl.importer(artifact_uri=validation, artifact_class=Artifact)
        train_dpo(stage_params=Path(stage_params).read_text(), prepared=data.output, validation=report.output)


    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    retry()
''')


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prepared dir (tiny SD, 24 pairs), an empty quarantine, and train_dpo's config view."""
    from components.stages import STEP_FUNCTIONS

    root = tmp_path_factory.mktemp("retry")
    build_tiny_sd(root / "prepared" / BASE_MODEL_DIR)
    write_shards(root / "prepared" / PAIRS_DIR, good_pairs_frame(24), rows_per_shard=16)
    (root / "validation").mkdir()
    pq.write_table(pa.schema(META_FIELDS).empty_table(), root / "validation" / QUARANTINE_FILE)  # nothing quarantined
    params = tiny_digits_params()
    params["train_dpo"].update(max_steps=STEPS, pairs_per_step=4, pairs_per_batch=4, checkpoint_every=5,
                               checkpoint_keep=2, learning_rate=1.0e-3)
    params["learning_curve"]["points"] = 0
    (root / "train_dpo.yaml").write_text(STEP_FUNCTIONS["configure"](yaml.safe_dump(params)).train_dpo)
    (root / "pipeline.py").write_text(PIPELINE)
    return root


def launch(inputs: Path, run_id: str, checkpoints: Path, pipeline_root: Path) -> subprocess.Popen:
    env = {**os.environ, "KFP_RUN_ID": run_id, "SPO_CHECKPOINT_ROOT": str(checkpoints), "SPO_PROGRESS": "0",
           "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, str(inputs / "pipeline.py"), str(inputs / "prepared"),
                             str(inputs / "validation"), str(inputs / "train_dpo.yaml"), str(pipeline_root)],
                            env=env, cwd=inputs, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{out[-4000:]}"
    return out


def outputs(pipeline_root: Path) -> tuple[dict, dict]:
    [metrics] = [p for p in pipeline_root.rglob("metrics.json") if p.parent.name == "dpo"]
    lora = load_file(metrics.parent / "lora" / LORA_WEIGHTS_FILE)
    return json.loads(metrics.read_text()), lora


def test_a_killed_training_task_resumes_from_its_checkpoint_when_retried(inputs, tmp_path, mlflow_db):
    checkpoints = tmp_path / "pvc" / "checkpoints"
    task_dir = checkpoints / "run-1" / "train_dpo"  # where component_checkpoint_dir puts this run's task

    first = launch(inputs, "run-1", checkpoints, tmp_path / "try1")
    deadline = time.monotonic() + 300
    while not list(task_dir.glob("step-*.pt")) or max(int(p.stem[5:]) for p in task_dir.glob("step-*.pt")) < 10:
        assert first.poll() is None, f"finished before it could be killed:\n{first.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the whole task: kfp.local's runner and the component process
    first.wait()
    killed_at = max(int(p.stem[5:]) for p in task_dir.glob("step-*.pt"))
    assert killed_at < STEPS

    retried = finished(launch(inputs, "run-1", checkpoints, tmp_path / "try2"), "the retry")
    metrics, lora = outputs(tmp_path / "try2")
    assert metrics["resumed_from_step"] >= killed_at >= 10, retried[-2000:]
    assert metrics["optimizer_steps"] == STEPS
    assert not list(task_dir.glob("step-*.pt"))  # the output is written: the checkpoints are cleared

    finished(launch(inputs, "run-2", checkpoints, tmp_path / "straight"), "the uninterrupted run")
    straight_metrics, straight = outputs(tmp_path / "straight")
    assert "resumed_from_step" not in straight_metrics  # another KFP run: its own, empty checkpoint dir
    assert straight.keys() == lora.keys()
    assert max((lora[k] - straight[k]).abs().max().item() for k in lora) < 1e-6
