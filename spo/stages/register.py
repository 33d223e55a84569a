"""Register the SPO LoRA adapter in the MLflow model registry, with its eval metrics and base model.

The model is a pyfunc wrapper (`SPOLoRAPipeline`): loading it builds a StableDiffusionPipeline from the
base model and loads the adapter with `load_lora_weights`; `predict` turns prompts into PNG bytes.
A base model that is a local directory (the digits world) is logged with the adapter, so the registered
model loads anywhere; a hub id (SD1.5, SDXL) is only referenced.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from spo.atomic_write import write_json
from spo.config import Config
from spo.data.model_locations import base_model_location
from spo.tracking.mlflow_tracker import flat_metrics
from spo.tracking.tracker import Tracker

LORA_SUBDIR = "lora"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
EVAL_METRICS_FILE = "metrics.json"
REGISTRATION_FILE = "registration.json"
MODEL_NAME_IN_RUN = "spo_lora"
# what `predict` takes and returns, shown in the MLflow UI (MLflow cannot infer it from DataFrame hints)
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
                           outputs=Schema([ColSpec("string", "prompt"), ColSpec("binary", "image_png")]))


class SPOLoRAPipeline(mlflow.pyfunc.PythonModel):
    """Base StableDiffusionPipeline + the SPO LoRA. Input: a `prompt` column (optional `seed`)."""

    def load_context(self, context: Any) -> None:
        from diffusers import StableDiffusionPipeline

        base = context.artifacts.get("base_model") or context.model_config["base_model"]
        self.pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        self.pipe.load_lora_weights(context.artifacts["lora"], weight_name=LORA_WEIGHTS_FILE)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        params = {"num_inference_steps": 20, "guidance_scale": 5.0, **(params or {})}
        seeds = model_input["seed"] if "seed" in model_input else range(len(model_input))
        images = []
        for prompt, seed in zip(model_input["prompt"], seeds):
            gen = torch.Generator(self.pipe.device).manual_seed(int(seed))
            image = self.pipe(prompt, generator=gen, **params).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            images.append(buf.getvalue())
        return pd.DataFrame({"prompt": list(model_input["prompt"]), "image_png": images})


def read_eval_metrics(eval_dir: Path) -> dict[str, float]:
    """The numeric, finite entries of eval_dir/metrics.json (nested dicts flattened with dots)."""
    path = Path(eval_dir) / EVAL_METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"evaluation metrics not found: {path}")
    try:
        return flat_metrics(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("diffusers", "peft", "transformers", "safetensors")] + ["torch"]


@contextmanager
def _model_run(cfg: Config) -> Iterator[mlflow.ActiveRun]:
    """The stage's active run (opened by stage_tracker), or a run of its own for library use."""
    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name="register") as run:
        yield run


def run(cfg: Config, *, prepared_dir: Path, spo_dir: Path, eval_dir: Path, out_dir: Path,
        tracker: Tracker) -> dict[str, float]:
    """Log + register the adapter, alias the new version, write out_dir/registration.json."""
    lora_dir = Path(spo_dir) / LORA_SUBDIR
    if not (lora_dir / LORA_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"LoRA weights not found: {lora_dir / LORA_WEIGHTS_FILE}")
    metrics = read_eval_metrics(Path(eval_dir))
    base = base_model_location(cfg, Path(prepared_dir))
    artifacts = {"lora": str(lora_dir.resolve())}  # resolved: MLflow refuses files behind a symlinked dir
    if Path(base).is_dir():
        artifacts["base_model"] = str(Path(base).resolve())
    name, alias = cfg.register.model_name, cfg.register.alias
    with _model_run(cfg) as active:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=SPOLoRAPipeline(), artifacts=artifacts,
            model_config={"base_model": base, "profile": cfg.profile}, pip_requirements=_pip_requirements(),
            registered_model_name=name, signature=SIGNATURE,
        )
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id, run_id=active.info.run_id)
        run_id, parent_id = active.info.run_id, active.data.tags.get("mlflow.parentRunId")
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version)
    tags = {"base_model": base, "profile": cfg.profile, **{f"metric.{k}": v for k, v in metrics.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    registration = {"model_name": name, "version": version, "alias": alias, "model_uri": f"models:/{name}/{version}",
                    "alias_uri": f"models:/{name}@{alias}", "logged_model_uri": info.model_uri,
                    "run_id": run_id, "parent_run_id": parent_id, "base_model": base, "eval_metrics": metrics}
    write_json(Path(out_dir) / REGISTRATION_FILE, registration)
    tracker.log_params({"register.version": version})
    return {"registered_version": float(version)}


def main(argv: list[str] | None = None) -> None:
    from spo.stages.stage_cli import stage_main

    def body(cfg: Config, args: Any, tracker: Tracker) -> dict[str, float]:
        return run(cfg, prepared_dir=args.prepared_dir, spo_dir=args.spo_dir, eval_dir=args.eval_dir,
                   out_dir=args.out_dir, tracker=tracker)

    stage_main("register", argv, ["prepared_dir", "spo_dir", "eval_dir", "out_dir"], body)


if __name__ == "__main__":
    main()
