"""The SPO Kubeflow pipeline: prepare -> validate -> train_spm -> train_spo -> evaluate -> register, with
train_dpo (the Diffusion-DPO baseline) beside train_spm/train_spo.

The same DAG as dvc.yaml. The whole config travels as one YAML string (`params_yaml`); the first step
opens the MLflow parent run that every stage nests under. Training and evaluation ask for one NVIDIA GPU
(kfp.local ignores resources, so the DAG also runs on a CPU for tests).

Caching: the parent run id is an input of every stage, so a new pipeline run never reuses a cached
stage (each run is one complete MLflow record); retrying a failed run keeps the id and so reuses the
stages that had succeeded.
"""


from kfp import dsl

from components.stages import (
    evaluate,
    open_mlflow_run,
    prepare,
    register,
    train_dpo,
    train_spm,
    train_spo,
    validate,
)

PIPELINE_NAME = "spo-pipeline"

# Requests for a GPU node; the digits profile fits easily, SD1.5/SDXL want the memory.
GPU_TASK_RESOURCES = {"cpu": "8", "memory": "64G"}
CPU_TASK_RESOURCES = {"cpu": "2", "memory": "8G"}
TRAINING_RETRIES = 2


def _on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return (task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
            .set_cpu_request(GPU_TASK_RESOURCES["cpu"]).set_memory_request(GPU_TASK_RESOURCES["memory"]))


def _on_cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    return task.set_cpu_request(CPU_TASK_RESOURCES["cpu"]).set_memory_request(CPU_TASK_RESOURCES["memory"])


def _retried(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Training tasks survive a preempted node or a flaky mount; backoff gives the node time to come back."""
    return task.set_retry(num_retries=TRAINING_RETRIES, backoff_duration="60s", backoff_factor=2.0)


@dsl.pipeline(name=PIPELINE_NAME, description="Step-by-step Preference Optimization: data -> SPM -> SPO -> eval")
def spo_pipeline(params_yaml: str) -> None:
    run = open_mlflow_run(params_yaml=params_yaml).set_caching_options(enable_caching=False)
    parent = run.output
    prep = _on_cpu(prepare(params_yaml=params_yaml, parent_run_id=parent))
    check = _on_cpu(validate(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"]))
    spm = _retried(_on_gpu(train_spm(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"],
                                     validation=check.outputs["report"])))
    spo = _retried(_on_gpu(train_spo(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"],
                                     spm=spm.outputs["spm"])))
    dpo = _retried(_on_gpu(train_dpo(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"],
                                     validation=check.outputs["report"])))
    evaluation = _on_gpu(evaluate(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"],
                                  spm=spm.outputs["spm"], spo=spo.outputs["spo"], dpo=dpo.outputs["dpo"]))
    _on_cpu(register(params_yaml=params_yaml, parent_run_id=parent, prepared=prep.outputs["prepared"],
                     spo=spo.outputs["spo"], dpo=dpo.outputs["dpo"], evaluation=evaluation.outputs["evaluation"]))
