"""KFP components: one per stage, each a thin wrapper that calls the stage's `run()` from `spo/`, plus the
steps around them (cut the config into stage views, open and close the MLflow parent run, launch a
multi-node TrainJob).

Every stage body parses its config view (one YAML string holding the sections in STAGE_SECTIONS: a dict
parameter would turn ints into floats), and calls the same `run()` that `dvc repro` calls, through the
same `stage_tracker`. The view is the only parameter, so KFP's cache key changes exactly when a section
that shapes the stage's output does. The MLflow parent run is found by the KFP run id (an env var from
the pod's label), not passed in. Bodies import `spo` lazily: they execute inside the image, where this
module (which imports kfp.dsl) is not imported.

Components are built per image (`build_components(image)`): `spo pipeline compile --image` or
`cluster.image` names it; nothing is installed at run time.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def configure(params_yaml: str) -> NamedTuple("StageParams", [  # inline: KFP ships only the function's source
        ("prepare", str), ("validate", str), ("train_spm", str), ("train_spo", str), ("train_dpo", str),
        ("evaluate", str), ("register", str)]):
    """Validate the whole config once, then cut it into each stage's view (STAGE_SECTIONS), canonical
    YAML so that equal sections give equal strings (and equal cache keys) whatever the file's order."""
    from collections import namedtuple

    import yaml

    from spo.config import config_from_dict, view_data
    from spo.stages import STAGE_SECTIONS

    data = yaml.safe_load(params_yaml)
    config_from_dict(data)
    views = {stage: yaml.safe_dump(view_data(data, sections), sort_keys=True, default_flow_style=True, width=10**9)
             for stage, sections in STAGE_SECTIONS.items()}
    return namedtuple("StageParams", list(views))(**views)


def open_mlflow_run(params_yaml: str, kfp_run_id: str) -> str:
    """Create the MLflow parent run of this KFP run (all params, tagged kfp.run_id); a retry finds it."""
    import os

    import yaml

    from spo.config import config_from_dict
    from spo.tracking.mlflow_tracker import KFP_RUN_ENV, open_pipeline_run

    os.environ.setdefault(KFP_RUN_ENV, kfp_run_id)  # the pod label's value, equal to the placeholder's
    return open_pipeline_run(config_from_dict(yaml.safe_load(params_yaml)))


def close_mlflow_run(params_yaml: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: whatever happened, runs a killed pod left RUNNING end FAILED, the parent by the
    pipeline's final state."""
    import os

    import yaml

    from spo.config import config_from_dict
    from spo.tracking.mlflow_tracker import KFP_RUN_ENV, close_pipeline_run

    os.environ.setdefault(KFP_RUN_ENV, kfp_run_id)
    parent = close_pipeline_run(config_from_dict(yaml.safe_load(params_yaml)), status.state,
                                status.error_message or "")
    print(f"MLflow parent run {parent}: pipeline {status.state}")


def prepare(stage_params: str, prepared: Output[Dataset], metrics: Output[Metrics]):
    """Build (digits) or read (Pick-a-Pic) the prepared data: base model, backbone, oracle, pairs, prompts."""
    from pathlib import Path

    from spo.stages.stage_cli import component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "prepare")
    result = run_component_stage("prepare", stage_params, cfg, out_dir=Path(prepared.path))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def validate(stage_params: str, prepared: Input[Dataset], report: Output[Artifact], data_docs: Output[HTML],
             metrics: Output[Metrics]):
    """Check every pair: bad rows are quarantined (report/quarantine.parquet, which training skips), bad
    tables fail the pipeline with a message naming each rule; report.html is the HTML artifact."""
    import shutil
    from pathlib import Path

    from spo.data.prepared_layout import PAIRS_DIR
    from spo.stages.stage_cli import component_config, run_component_stage
    from spo.stages.validate import HTML_FILE
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "validate")
    try:
        result = run_component_stage("validate", stage_params, cfg, pairs_dir=Path(prepared.path) / PAIRS_DIR,
                                     out_dir=Path(report.path))
    finally:  # the report is written whatever the verdict: show it
        if (Path(report.path) / HTML_FILE).is_file():
            shutil.copy(Path(report.path) / HTML_FILE, data_docs.path)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def train_spm(stage_params: str, prepared: Input[Dataset], validation: Input[Artifact], spm: Output[Model],
              metrics: Output[Metrics]):
    """Train the step-aware preference model (DESIGN 3.1) on the pairs `validate` did not quarantine.
    Checkpoints go to the PVC under this KFP run's id: a retried task resumes there."""
    from pathlib import Path

    from spo.stages.stage_cli import component_checkpoint_dir, component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "train_spm")
    result = run_component_stage("train_spm", stage_params, cfg, prepared_dir=Path(prepared.path),
                                 validate_dir=Path(validation.path), out_dir=Path(spm.path),
                                 checkpoint_dir=component_checkpoint_dir("train_spm"))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def train_spo(stage_params: str, prepared: Input[Dataset], spm: Input[Model], spo: Output[Model],
              metrics: Output[Metrics]):
    """SPO fine-tuning of the base model's UNet (LoRA), guided by the SPM (DESIGN 3.2); resumable as train_spm."""
    from pathlib import Path

    from spo.stages.stage_cli import component_checkpoint_dir, component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "train_spo")
    result = run_component_stage("train_spo", stage_params, cfg, prepared_dir=Path(prepared.path),
                                 spm_dir=Path(spm.path), out_dir=Path(spo.path),
                                 checkpoint_dir=component_checkpoint_dir("train_spo"))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def train_dpo(stage_params: str, prepared: Input[Dataset], validation: Input[Artifact], dpo: Output[Model],
              metrics: Output[Metrics]):
    """The Diffusion-DPO baseline (DESIGN 3.3) on the pairs `validate` did not quarantine, parallel to
    train_spo; with train_dpo.enabled false it writes a marker that evaluate and register skip."""
    from pathlib import Path

    from spo.stages.stage_cli import component_checkpoint_dir, component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "train_dpo")
    result = run_component_stage("train_dpo", stage_params, cfg, prepared_dir=Path(prepared.path),
                                 validate_dir=Path(validation.path), out_dir=Path(dpo.path),
                                 checkpoint_dir=component_checkpoint_dir("train_dpo"))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def evaluate(stage_params: str, prepared: Input[Dataset], spm: Input[Model], spo: Input[Model], dpo: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown]):
    """Every evaluate.models entry on fixed prompts and seeds: scores, CIs, win rates, report (DESIGN 3.4).
    The report and its Markdown summary are also KFP HTML/Markdown artifacts, shown in the run's UI."""
    import shutil
    from pathlib import Path

    from spo.stages.evaluate import REPORT_FILE, SUMMARY_FILE
    from spo.stages.stage_cli import component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "evaluate")
    out = Path(evaluation.path)
    result = run_component_stage("evaluate", stage_params, cfg, prepared_dir=Path(prepared.path),
                                 spm_dir=Path(spm.path), spo_dir=Path(spo.path), dpo_dir=Path(dpo.path), out_dir=out,
                                 images_dir=out.with_name(out.name + "_images"))
    shutil.copyfile(out / REPORT_FILE, report.path)
    shutil.copyfile(out / SUMMARY_FILE, summary.path)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def register(stage_params: str, prepared: Input[Dataset], spo: Input[Model], dpo: Input[Model],
             evaluation: Input[Artifact], registration: Output[Artifact], metrics: Output[Metrics]):
    """Register the SPO and DPO LoRAs in the MLflow model registry, gate the champion; ends the parent run."""
    from pathlib import Path

    from spo.stages.stage_cli import component_config, run_component_stage
    from spo.tracking.mlflow_tracker import flat_metrics

    cfg = component_config(stage_params, "register")
    result = run_component_stage("register", stage_params, cfg, prepared_dir=Path(prepared.path),
                                 spo_dir=Path(spo.path), dpo_dir=Path(dpo.path), eval_dir=Path(evaluation.path),
                                 out_dir=Path(registration.path))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


def train_on_nodes(stage: str, stage_params: str, cluster_yaml: str, image: str, prepared: Input[Dataset],
                   upstream: Input[Artifact], model: Output[Model], metrics: Output[Metrics]):
    """A training stage on several GPU nodes (cluster.stages.<stage>.nodes > 1): a Kubeflow Trainer TrainJob
    (or v1 PyTorchJob) running the same stage command, its node-0 log streamed here, its output copied
    back as this task's artifact (pipelines/distributed_stage.py)."""
    from pathlib import Path

    from pipelines.distributed_stage import run_stage_on_nodes
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics

    component_config(stage_params, stage)  # a bad config fails here, naming the key, not on the nodes
    result = run_stage_on_nodes(stage, stage_params, cluster_yaml, image, prepared=Path(prepared.path),
                                upstream=Path(upstream.path), out_dir=Path(model.path))
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


STAGE_FUNCTIONS = {"prepare": prepare, "validate": validate, "train_spm": train_spm, "train_spo": train_spo,
                   "train_dpo": train_dpo, "evaluate": evaluate, "register": register}
STEP_FUNCTIONS = {"configure": configure, "open_mlflow_run": open_mlflow_run, "close_mlflow_run": close_mlflow_run,
                  "train_on_nodes": train_on_nodes}


def build_components(image: str) -> dict:
    """Every step as a KFP component on `image`, with nothing installed at run time."""
    return {name: dsl.component(func, base_image=image, install_kfp_package=False, packages_to_install=[])
            for name, func in {**STEP_FUNCTIONS, **STAGE_FUNCTIONS}.items()}
