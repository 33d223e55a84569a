"""A training stage on several nodes: the compiled launcher task, the TrainJob / PyTorchJob it would
create (against the CRD schemas kept in tests/data/crds), and the nodes' command, run here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT
from pydantic import TypeAdapter
from test_kfp_pipeline import compile_profile, dag_tasks
from test_kfp_retry import inputs  # noqa: F401  (the fixture: a tiny prepared dir and train_dpo's view)
from test_trainjob import FakeCluster, crd_errors

from pipelines.distributed_stage import job_for_stage, run_stage_on_nodes
from pipelines.trainjob import manifest
from spo.config import ClusterConfig, load_profile

pytest.importorskip("kfp")

MULTI = ["-S", "cluster.stages.train_spo.nodes=2"]


def test_a_multi_node_stage_compiles_to_a_launcher_with_the_pvc_and_retries(tmp_path):
    _, spec, k8s = compile_profile(tmp_path, "sd15", *MULTI)
    tasks = dag_tasks(spec)
    assert "train-spo" not in tasks
    launcher = tasks["train-on-nodes"]
    assert launcher["taskInfo"]["name"] == "train_spo"  # what the KFP UI shows
    assert launcher["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == "train_spo"
    assert launcher["retryPolicy"]["maxRetryCount"] == 2  # a retry is a new job that resumes
    assert tasks["evaluate"]["inputs"]["artifacts"]["spo"]["taskOutputArtifact"] == {
        "producerTask": "train-on-nodes", "outputArtifactKey": "model"}
    container = spec["deploymentSpec"]["executors"]["exec-train-on-nodes"]["container"]
    assert "accelerator" not in container["resources"]  # the GPUs are the TrainJob's, not the launcher's
    assert k8s["exec-train-on-nodes"]["pvcMount"][0]["constant"] == "spo-cache"
    cluster = yaml.safe_load(launcher["inputs"]["parameters"]["cluster_yaml"]["runtimeValue"]["constant"])
    assert cluster["stages"]["train_spo"] == {"gpus": 4, "nodes": 2, "cpu": "16", "memory": "200G",
                                              "cpu_limit": None, "memory_limit": None}
    assert "train-spm" in tasks and "train-dpo" in tasks  # one node each: plain tasks


def test_a_multi_node_stage_without_a_shared_volume_is_refused(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli_main(["compile", "--profile", "sd15", "--output", str(out), *MULTI,
                     "-S", "cluster.mlflow_tracking_uri=http://mlflow:5000"]) == 2
    assert "stages.train_spo.nodes > 1 needs pvc" in capsys.readouterr().err


def cli_main(argv):
    from pipelines import cli

    return cli.main(argv)


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_the_job_of_a_stage_validates_and_carries_image_command_gpus_and_pvc(kind, tmp_path):
    cluster = load_profile("sd15", ["cluster.stages.train_spo.nodes=2", "cluster.pvc=spo-cache",
                                    "cluster.mlflow_credentials_secret=mlflow-auth", "cluster.hf_token_secret=hf-token",
                                    "cluster.mlflow_tracking_uri=http://mlflow:5000"], require_implemented=False).cluster
    work = tmp_path / "runs" / "run-1" / "train_spo"
    job = job_for_stage("train_spo", cluster, "registry.example.com/spo:1", "0f3a9c2e-77b1-4cde-9a1b-53a6a1f0c9d1",
                        work, "team-a")
    body = manifest(job, kind)
    assert crd_errors(kind, body) == []
    text = json.dumps(body)
    assert "registry.example.com/spo:1" in text and "/mnt/spo" in text and "spo-cache" in text
    assert "-m spo.cli train_spo" in text and "--stage-view" in text and "--spm-dir" in text
    assert "/mnt/spo/checkpoints/0f3a9c2e-77b1-4cde-9a1b-53a6a1f0c9d1/train_spo" in text  # a retry resumes there
    assert '"secretKeyRef": {"name": "mlflow-auth", "key": "password"}' in text.replace(', "optional": false', "")
    if kind == "TrainJob":
        assert body["spec"]["trainer"]["numNodes"] == 2
        assert body["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    else:
        replicas = body["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == 2


@pytest.mark.slow
def test_the_nodes_command_runs_the_stage(inputs, tmp_path, mlflow_db):  # noqa: F811
    """What every node runs, minus accelerate's rendezvous: the `spo` part of the job's command, on a
    work dir laid out as run_stage_on_nodes lays it out on the PVC."""
    cluster = load_profile("sd15", ["cluster.stages.train_dpo.nodes=2", "cluster.pvc=spo-cache"],
                           require_implemented=False).cluster
    work = tmp_path / "runs" / "run-1" / "train_dpo"
    shutil.copytree(inputs / "prepared", work / "prepared")
    shutil.copytree(inputs / "validation", work / "upstream")
    shutil.copy(inputs / "train_dpo.yaml", work / "params.yaml")
    job = job_for_stage("train_dpo", cluster, "img", "run-1", work, "ns")
    argv = [a.replace(f"{cluster.mount_path}/checkpoints", str(tmp_path / "checkpoints")) for a in job.stage_argv]
    env = {**os.environ, "KFP_RUN_ID": "run-1", "SPO_PROGRESS": "0", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "spo.cli", *argv, "-S", "train_dpo.max_steps=3"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((work / "out" / "metrics.json").read_text())["optimizer_steps"] == 3


@pytest.mark.slow
def test_a_gpu_task_runs_its_stage_in_one_process_per_gpu(inputs, tmp_path, mlflow_db, monkeypatch):  # noqa: F811
    """SPO_NUM_PROCESSES=N (what compile sets from cluster.stages.<stage>.gpus) makes the component run
    the stage's CLI under `accelerate launch` in N processes (gloo here): the same result as one."""
    from spo.stages.stage_cli import component_config, run_component_stage

    view = yaml.safe_load((inputs / "train_dpo.yaml").read_text())
    view["train_dpo"].update(max_steps=3, checkpoint_every=0)
    stage_params = yaml.safe_dump(view)
    cfg = component_config(stage_params, "train_dpo")
    monkeypatch.setenv("KFP_RUN_ID", "run-gpus")
    monkeypatch.setenv("SPO_PROGRESS", "0")
    results = {}
    for processes in (1, 2):
        monkeypatch.setenv("SPO_NUM_PROCESSES", str(processes))
        out = tmp_path / f"dpo-{processes}"
        results[processes] = run_component_stage("train_dpo", stage_params, cfg, prepared_dir=inputs / "prepared",
                                                 validate_dir=inputs / "validation", out_dir=out, checkpoint_dir=None)
        assert (out / "lora").is_dir()
    assert results[2]["num_processes"] == 2.0 and results[1]["num_processes"] == 1.0
    assert results[2]["optimizer_steps"] == results[1]["optimizer_steps"] == 3
    assert results[2]["pairs_seen"] == results[1]["pairs_seen"]
    assert results[2]["final_loss"] == pytest.approx(results[1]["final_loss"], rel=1e-4)  # the same global batch


@pytest.mark.slow
def test_the_launcher_stages_inputs_runs_the_job_and_copies_its_output_back(inputs, tmp_path, mlflow_db,  # noqa: F811
                                                                             monkeypatch):
    """run_stage_on_nodes against a loopback Kubernetes API whose node 0 really runs its container
    command here (accelerate replaced by a one-process stub, the PVC a local dir): the inputs staged on
    the PVC, the stage run by the job's own command, its output back in the launcher's artifact."""
    stub = tmp_path / "bin" / "accelerate"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\nwhile [ "$1" != "-m" ]; do shift; done\nshift\nexec {sys.executable} -m "$@"\n')
    stub.chmod(0o755)

    class RunningCluster(FakeCluster):
        """The toy controller, plus node 0 running the TrainJob's command (as its pod would)."""

        def _controller_create(self, kind, obj):
            super()._controller_create(kind, obj)
            trainer = obj["spec"]["trainer"]
            env = {e["name"]: e["value"] for e in trainer["env"] if "value" in e}
            done = subprocess.run(trainer["command"], env={**os.environ, **env, "PET_NNODES": "1", "PET_NODE_RANK": "0",
                                                           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": "29500",
                                                           "PATH": f"{stub.parent}:{os.environ['PATH']}",
                                                           "PYTHONPATH": str(REPO_ROOT)},
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]

    pvc = tmp_path / "pvc"
    cluster = load_profile("sd15", ["cluster.stages.train_dpo.nodes=2", "cluster.pvc=spo-cache",
                                    f"cluster.mount_path={pvc}"], require_implemented=False).cluster
    cluster_yaml = yaml.safe_dump(TypeAdapter(ClusterConfig).dump_python(cluster, mode="json"))
    view = yaml.safe_load((inputs / "train_dpo.yaml").read_text())
    view["train_dpo"].update(max_steps=3, checkpoint_every=0)
    monkeypatch.setenv("KFP_RUN_ID", "run-nodes")
    monkeypatch.setenv("SPO_JOB_NAMESPACE", "kubeflow")
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    fake = RunningCluster()
    try:
        printed = []
        metrics = run_stage_on_nodes("train_dpo", yaml.safe_dump(view), cluster_yaml, "img:1", prepared=inputs / "prepared",
                                     upstream=inputs / "validation", out_dir=tmp_path / "artifact",
                                     api_client=fake.api_client(), out=printed.append, poll_s=0.05)
    finally:
        fake.close()
    work = pvc / "runs" / "run-nodes" / "train_dpo"
    assert (work / "prepared" / "pairs").is_dir() and (work / "upstream" / "quarantine.parquet").is_file()
    assert metrics["optimizer_steps"] == 3
    assert json.loads((tmp_path / "artifact" / "metrics.json").read_text()) == metrics
    assert (tmp_path / "artifact" / "lora").is_dir()
    [posted] = fake.posted
    assert posted["metadata"]["name"] == "spo-train-dpo-runnodes" and posted["spec"]["trainer"]["numNodes"] == 2
    assert any("created TrainJob kubeflow/spo-train-dpo-runnodes" in line for line in printed)
