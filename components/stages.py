"""KFP components: one per stage, each a thin wrapper that calls the stage's `run()` from `spo/`.

Every body only parses the config (one YAML string: a dict parameter would turn ints into floats),
joins the pipeline's MLflow parent run, and calls the same `run()` that `dvc repro` calls, through the
same `stage_tracker`. Bodies import `spo` lazily: they execute inside the image, where this module
(which imports kfp.dsl) must not be imported.

The image holds the `spo-pipeline` package with kfp; set SPO_COMPONENT_IMAGE before compiling to use
your own build (`install_kfp_package=False`, nothing installed at run time).
"""


import os

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/spo-pipeline/spo:0.1.0-python"
BASE_IMAGE = os.environ.get("SPO_COMPONENT_IMAGE", DEFAULT_IMAGE)


def spo_component(func):
    """@dsl.component with the project image and no run-time installs."""
    return dsl.component(func, base_image=BASE_IMAGE, install_kfp_package=False, packages_to_install=[])


@spo_component
def open_mlflow_run(params_yaml: str) -> str:
    """Create the MLflow parent run of this pipeline run; stages nest under the returned id."""
    import yaml

    from spo.config import config_from_dict
    from spo.tracking.mlflow_tracker import open_pipeline_run

    return open_pipeline_run(config_from_dict(yaml.safe_load(params_yaml)))


@spo_component
def prepare(params_yaml: str, parent_run_id: str, prepared: Output[Dataset], metrics: Output[Metrics]):
    """Build (digits) or read (Pick-a-Pic) the prepared data: base model, backbone, oracle, pairs, prompts."""
    from pathlib import Path

    from spo.stages import prepare as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    with stage_tracker("prepare", cfg) as tracker:
        result = stage.run(cfg, out_dir=Path(prepared.path), tracker=tracker)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def validate(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], report: Output[Artifact],
             data_docs: Output[HTML], metrics: Output[Metrics]):
    """Check every pair: bad rows are quarantined (report/quarantine.parquet, which training skips), bad
    tables fail the pipeline with a message naming each rule; report.html is the HTML artifact."""
    import shutil
    from pathlib import Path

    from spo.data.prepared_layout import PAIRS_DIR
    from spo.stages import validate as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    try:
        with stage_tracker("validate", cfg) as tracker:
            result = stage.run(cfg, pairs_dir=Path(prepared.path) / PAIRS_DIR, out_dir=Path(report.path),
                               tracker=tracker)
    finally:  # the report is written whatever the verdict: show it
        if (Path(report.path) / stage.HTML_FILE).is_file():
            shutil.copy(Path(report.path) / stage.HTML_FILE, data_docs.path)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def train_spm(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], validation: Input[Artifact],
              spm: Output[Model], metrics: Output[Metrics]):
    """Train the step-aware preference model (DESIGN 3.1) on the pairs `validate` did not quarantine.
    Checkpoints: none yet on a cluster (a retried pod would need a volume to find them: the Kubeflow issue)."""
    from pathlib import Path

    from spo.stages import train_spm as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    with stage_tracker("train_spm", cfg) as tracker:
        result = stage.run(cfg, prepared_dir=Path(prepared.path), validate_dir=Path(validation.path),
                           out_dir=Path(spm.path), tracker=tracker)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def train_spo(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], spm: Input[Model],
              spo: Output[Model], metrics: Output[Metrics]):
    """SPO fine-tuning of the base model's UNet (LoRA), guided by the SPM (DESIGN 3.2)."""
    from pathlib import Path

    from spo.stages import train_spo as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    with stage_tracker("train_spo", cfg) as tracker:
        result = stage.run(cfg, prepared_dir=Path(prepared.path), spm_dir=Path(spm.path), out_dir=Path(spo.path),
                           tracker=tracker)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def train_dpo(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], validation: Input[Artifact],
              dpo: Output[Model], metrics: Output[Metrics]):
    """The Diffusion-DPO baseline (DESIGN 3.3) on the pairs `validate` did not quarantine, parallel to
    train_spo; with train_dpo.enabled false it writes a marker that evaluate and register skip."""
    from pathlib import Path

    from spo.stages import train_dpo as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    with stage_tracker("train_dpo", cfg) as tracker:
        result = stage.run(cfg, prepared_dir=Path(prepared.path), validate_dir=Path(validation.path),
                           out_dir=Path(dpo.path), tracker=tracker)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def evaluate(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], spm: Input[Model],
             spo: Input[Model], dpo: Input[Model], evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[HTML],
             summary: Output[Markdown]):
    """Every evaluate.models entry on fixed prompts and seeds: scores, CIs, win rates, report (DESIGN 3.4).
    The report and its Markdown summary are also KFP HTML/Markdown artifacts, shown in the run's UI."""
    import shutil
    from pathlib import Path

    from spo.stages import evaluate as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    out = Path(evaluation.path)
    with stage_tracker("evaluate", cfg) as tracker:
        result = stage.run(cfg, prepared_dir=Path(prepared.path), spm_dir=Path(spm.path), spo_dir=Path(spo.path),
                           dpo_dir=Path(dpo.path), out_dir=out, tracker=tracker,
                           images_dir=out.with_name(out.name + "_images"))
    shutil.copyfile(out / stage.REPORT_FILE, report.path)
    shutil.copyfile(out / stage.SUMMARY_FILE, summary.path)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


@spo_component
def register(params_yaml: str, parent_run_id: str, prepared: Input[Dataset], spo: Input[Model], dpo: Input[Model],
             evaluation: Input[Artifact], registration: Output[Artifact], metrics: Output[Metrics]):
    """Register the SPO and DPO LoRAs in the MLflow model registry, gate the champion; ends the parent run."""
    from pathlib import Path

    from spo.stages import register as stage
    from spo.stages.stage_cli import component_config
    from spo.tracking.mlflow_tracker import flat_metrics, stage_tracker

    cfg = component_config(params_yaml, parent_run_id)
    with stage_tracker("register", cfg) as tracker:
        result = stage.run(cfg, prepared_dir=Path(prepared.path), spo_dir=Path(spo.path), dpo_dir=Path(dpo.path),
                           eval_dir=Path(evaluation.path), out_dir=Path(registration.path), tracker=tracker)
    for name, value in flat_metrics(result).items():
        metrics.log_metric(name, value)


STAGE_COMPONENTS = {"prepare": prepare, "validate": validate, "train_spm": train_spm, "train_spo": train_spo,
                    "train_dpo": train_dpo, "evaluate": evaluate, "register": register}
