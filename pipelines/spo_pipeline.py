"""The SPO Kubeflow pipeline: prepare -> validate -> train_spm -> train_spo -> evaluate -> register, with
train_dpo (the Diffusion-DPO baseline) beside train_spm/train_spo. The same DAG as dvc.yaml.

Built at compile time from the config's `cluster` section (`build_pipeline`): the image, each stage's
GPUs/CPU/memory, the GPU pool's node selector and tolerations, the PVC (HF cache, checkpoints), the
MLflow server and the Secrets whose keys become env (never parameters). The run's one parameter is the
whole config (`params_yaml`); a `configure` step (cheap, cached) cuts it into per-stage views, so each stage's
cache key covers only the sections that shape its output (a sweep over `train_spo.beta` reuses prepare,
validate, train_spm and train_dpo from the cache). MLflow runs nest under a parent found by the KFP run
id, which every pod reads from its `pipeline/runid` label: an input would defeat the cache. An exit
handler ends what a killed pod left RUNNING.
"""


import yaml
from kfp import dsl, kubernetes
from pydantic import TypeAdapter

from components.stages import build_components
from spo.config import ClusterConfig, StageResources
from spo.stages.stage_cli import CHECKPOINT_ROOT_ENV, PROCESSES_ENV
from spo.tracking.mlflow_tracker import KFP_RUN_ENV, KFP_UI_ENV

PIPELINE_NAME = "spo-pipeline"
TRAINING_STAGES = ("train_spm", "train_spo", "train_dpo")
UNCACHED = ("open_mlflow_run", "close_mlflow_run", "register")  # side effects on MLflow's store and registry
RUN_ID_LABEL = "metadata.labels['pipeline/runid']"  # set by the KFP backend on every pod of a run
OUTPUTS = {"prepare": "prepared", "train_spm": "spm", "train_spo": "spo", "train_dpo": "dpo"}  # the main artifact


class TaskSettings:
    """Applies the cluster section to one task; `on_cluster=False` (kfp.local) skips the pod settings."""

    def __init__(self, cluster: ClusterConfig, on_cluster: bool) -> None:
        self.cluster, self.on_cluster = cluster, on_cluster

    def common(self, task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
        """Every step: caching by kind, and (on a cluster) the run id, MLflow's address and credentials."""
        task.set_caching_options(enable_caching=step not in UNCACHED)
        if not self.on_cluster or step == "configure":  # configure only cuts the config: it talks to nobody
            return task
        c = self.cluster
        kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ENV, field_path=RUN_ID_LABEL)
        if c.mlflow_tracking_uri:
            task.set_env_variable("MLFLOW_TRACKING_URI", c.mlflow_tracking_uri)
        if c.kfp_ui_url:
            task.set_env_variable(KFP_UI_ENV, c.kfp_ui_url)
        if c.mlflow_credentials_secret:
            kubernetes.use_secret_as_env(task, secret_name=c.mlflow_credentials_secret, secret_key_to_env={
                "username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"})
        return task

    def stage(self, task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
        """A stage: its resources, and on a GPU its pool, processes and shared memory; training: retries."""
        self.common(task, stage)
        if stage in TRAINING_STAGES and self.cluster.training_retries:
            task.set_retry(num_retries=self.cluster.training_retries,
                           backoff_duration=f"{self.cluster.retry_backoff_s}s", backoff_factor=2.0)
        if not self.on_cluster:
            return task
        c, res = self.cluster, getattr(self.cluster.stages, stage)
        _resources(task, res)
        if c.hf_token_secret:
            kubernetes.use_secret_as_env(task, secret_name=c.hf_token_secret, secret_key_to_env={"token": "HF_TOKEN"})
        if c.pvc:
            kubernetes.mount_pvc(task, pvc_name=c.pvc, mount_path=c.mount_path)
            task.set_env_variable("HF_HOME", f"{c.mount_path}/hf")
            if stage in TRAINING_STAGES:
                task.set_env_variable(CHECKPOINT_ROOT_ENV, f"{c.mount_path}/checkpoints")
        if res.gpus:
            task.set_accelerator_type(c.gpu_resource).set_accelerator_limit(res.gpus)
            task.set_env_variable(PROCESSES_ENV, str(res.gpus))
            for key, value in c.gpu_node_selector.items():
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for tol in c.gpu_tolerations:
                kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=c.shm_size)
        return task

    def launcher(self, task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
        """The launcher of a multi-node stage: a small CPU pod with the PVC (it stages the job's inputs and
        collects its output there), retried like the stage; the GPUs are the TrainJob's."""
        self.common(task, stage)
        if self.cluster.training_retries:
            task.set_retry(num_retries=self.cluster.training_retries,
                           backoff_duration=f"{self.cluster.retry_backoff_s}s", backoff_factor=2.0)
        if self.on_cluster:
            task.set_cpu_request("1").set_memory_request("4G")
            kubernetes.mount_pvc(task, pvc_name=self.cluster.pvc, mount_path=self.cluster.mount_path)
        return task

    def step(self, task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
        """A small CPU step (configure, the MLflow parent's open and close)."""
        self.common(task, step)
        if self.on_cluster:
            task.set_cpu_request("500m").set_memory_request("1G").set_memory_limit("2G")
        return task


def _resources(task: dsl.PipelineTask, res: StageResources) -> None:
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


def build_pipeline(cluster: ClusterConfig, image: str | None = None, *, on_cluster: bool = True):
    """The pipeline function for `cluster` (image: `image` or cluster.image). on_cluster=False builds the
    same DAG without pod settings, for kfp.local."""
    comps = build_components(image or cluster.image)
    settings = TaskSettings(cluster, on_cluster)
    cluster_yaml = yaml.safe_dump(TypeAdapter(ClusterConfig).dump_python(cluster, mode="json"), sort_keys=True)

    @dsl.pipeline(name=PIPELINE_NAME, description="Step-by-step Preference Optimization: data -> SPM -> SPO/DPO -> eval")
    def spo_pipeline(params_yaml: str) -> None:
        closer = settings.step(comps["close_mlflow_run"](params_yaml=params_yaml,
                                                         kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "close_mlflow_run")
        with dsl.ExitHandler(closer, name="mlflow-run"):
            views = settings.step(comps["configure"](params_yaml=params_yaml), "configure")
            parent = settings.step(comps["open_mlflow_run"](params_yaml=params_yaml,
                                                            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                                   "open_mlflow_run").after(views)

            def stage(name: str, **inputs):
                """The stage's task and its main output artifact."""
                if on_cluster and getattr(cluster.stages, name).nodes > 1:  # a TrainJob: the task launches, waits
                    prepared_in, [upstream] = inputs.pop("prepared"), list(inputs.values())
                    task = comps["train_on_nodes"](stage=name, stage_params=views.outputs[name], cluster_yaml=cluster_yaml,
                                                   image=image or cluster.image, prepared=prepared_in, upstream=upstream)
                    task.set_display_name(name)
                    return settings.launcher(task.after(parent), name), task.outputs["model"]
                task = settings.stage(comps[name](stage_params=views.outputs[name], **inputs).after(parent), name)
                return task, task.outputs.get(OUTPUTS.get(name, ""))

            prep, prepared = stage("prepare")
            check, _ = stage("validate", prepared=prepared)
            report = check.outputs["report"]
            _, spm = stage("train_spm", prepared=prepared, validation=report)
            _, spo = stage("train_spo", prepared=prepared, spm=spm)
            _, dpo = stage("train_dpo", prepared=prepared, validation=report)
            evaluation, _ = stage("evaluate", prepared=prepared, spm=spm, spo=spo, dpo=dpo)
            stage("register", prepared=prepared, spo=spo, dpo=dpo, evaluation=evaluation.outputs["evaluation"])

    return spo_pipeline
