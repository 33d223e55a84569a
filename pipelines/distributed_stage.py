"""A training stage on more than one node (cluster.stages.<stage>.nodes > 1): what the KFP launcher
component does around `pipelines.trainjob.run_distributed_job`.

TrainJob pods cannot read or write KFP artifacts, so the launcher stages everything on the shared PVC
(ReadWriteMany, cluster.pvc) under `runs/<KFP run id>/<stage>/`: the input artifacts are copied there,
every node runs the same `spo <stage> --stage-view` command as `dvc repro` does (rank 0 writes the
output and tracks to MLflow under the run's parent, found by KFP_RUN_ID like any task), and the launcher
copies the output back into its KFP artifact. Checkpoints live under `checkpoints/<KFP run id>/<stage>`,
so a KFP retry (a new job, `-r<retry>` in its name) resumes. No kfp import: it runs inside the image.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from spo.config import ClusterConfig
from spo.stages.stage_cli import run_checkpoint_dir
from spo.tracking.mlflow_tracker import KFP_RUN_ENV, KFP_UI_ENV

# each training stage's second input, as its CLI names it
UPSTREAM_FLAG = {"train_spm": "--validate-dir", "train_spo": "--spm-dir", "train_dpo": "--validate-dir"}


def job_for_stage(stage: str, cluster: ClusterConfig, image: str, run_id: str, work: Path, namespace: str):
    """The DistributedJob of one stage of one KFP run (its files under `work`, on the PVC)."""
    from pipelines.trainjob import DistributedJob, SecretEnv

    res = getattr(cluster.stages, stage)
    argv = (stage, "--params", str(work / "params.yaml"), "--stage-view", "--prepared-dir", str(work / "prepared"),
            UPSTREAM_FLAG[stage], str(work / "upstream"), "--out-dir", str(work / "out"),
            "--checkpoint-dir", str(run_checkpoint_dir(f"{cluster.mount_path}/checkpoints", run_id, stage)))
    env = {KFP_RUN_ENV: run_id, "HF_HOME": f"{cluster.mount_path}/hf", "SPO_PROGRESS": "0"}
    if cluster.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = cluster.mlflow_tracking_uri
    if cluster.kfp_ui_url:
        env[KFP_UI_ENV] = cluster.kfp_ui_url
    secrets = []
    if cluster.mlflow_credentials_secret:
        secrets += [SecretEnv(cluster.mlflow_credentials_secret, "username", "MLFLOW_TRACKING_USERNAME"),
                    SecretEnv(cluster.mlflow_credentials_secret, "password", "MLFLOW_TRACKING_PASSWORD")]
    if cluster.hf_token_secret:
        secrets.append(SecretEnv(cluster.hf_token_secret, "token", "HF_TOKEN"))
    return DistributedJob(
        name=f"spo-{stage.replace('_', '-')}-{''.join(c for c in run_id.lower() if c.isalnum())[:12]}",
        namespace=namespace, image=image, stage_argv=argv, num_nodes=res.nodes, gpus_per_node=res.gpus,
        cpu=res.cpu_limit or res.cpu, memory=res.memory_limit or res.memory, env=env, secret_env=tuple(secrets),
        pvc_name=cluster.pvc, mount_path=cluster.mount_path, node_selector=dict(cluster.gpu_node_selector),
        tolerations=tuple({k: v for k, v in (("key", t.key), ("operator", t.operator), ("value", t.value),
                                             ("effect", t.effect)) if v is not None} for t in cluster.gpu_tolerations),
        labels={"spo.pipeline/kfp-run-id": ''.join(c for c in run_id if c.isalnum() or c in "-_.")[:63],
                "spo.pipeline/stage": stage.replace("_", "-")},
        runtime=cluster.distributed.runtime, shm_size=cluster.shm_size,
        active_deadline_s=cluster.distributed.timeout_s, gpu_resource=cluster.gpu_resource)


def run_stage_on_nodes(stage: str, stage_params: str, cluster_yaml: str, image: str, *, prepared: Path,
                       upstream: Path, out_dir: Path, api_client=None, out: Callable[[str], Any] = print,
                       poll_s: float = 30) -> dict:
    """Stage the inputs on the PVC, run the job, copy its output into `out_dir`; returns its metrics."""
    import yaml
    from pydantic import TypeAdapter

    from pipelines.trainjob import in_cluster_namespace, run_distributed_job

    cluster = TypeAdapter(ClusterConfig).validate_python(yaml.safe_load(cluster_yaml))
    if not cluster.pvc:
        raise ValueError(f"cluster.stages.{stage}.nodes > 1 needs cluster.pvc: the nodes and this launcher "
                         "share the inputs, checkpoints and output through it")
    run_id = os.environ[KFP_RUN_ENV]
    work = Path(cluster.mount_path) / "runs" / run_id / stage
    for name, source in (("prepared", prepared), ("upstream", upstream)):
        shutil.copytree(source, work / name, dirs_exist_ok=True)
    (work / "params.yaml").write_text(stage_params)
    namespace = os.environ.get("SPO_JOB_NAMESPACE") or in_cluster_namespace()  # the launcher pod's, by default
    job = job_for_stage(stage, cluster, image, run_id, work, namespace)
    run_distributed_job(job, kind=cluster.distributed.kind, api_client=api_client,
                        timeout_s=cluster.distributed.timeout_s, poll_s=poll_s, out=out)
    shutil.copytree(work / "out", out_dir, dirs_exist_ok=True)
    return json.loads((work / "out" / "metrics.json").read_text())
