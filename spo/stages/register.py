"""Stage `register`: log this run's SPO LoRA as an MLflow model, register it, and gate the champion.

The model uses MLflow's own `mlflow.diffusers` flavour: the adapter's safetensors plus a reference to the
base pipeline (hub id, with the hub revision the flavour resolves, or a local dir), loaded back with
`DiffusionPipeline` -- SD1.5 and SDXL alike -- and nothing of this package pickled in, so
`mlflow.pyfunc.load_model("models:/NAME@champion")` generates images wherever diffusers and peft are
installed. A local base dir (the digits world) is only referenced: pass
`model_config={"base_model": ...}` when loading it on another machine.

Gate: the new version gets alias `register.alias` (candidate). Alias `register.champion_alias` moves to
it only if its paired win rate on `register.primary_metric` against the current champion -- the same
(prompt, seed) samples, scored the same way, checked by the evaluation protocol's fingerprint -- exceeds
`register.promote_threshold` and the bootstrap CI's lower end exceeds 0.5. The first version becomes
champion. Decision and numbers are written as model-version tags and into registration.json.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.diffusers
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from spo.atomic_write import write_json
from spo.config import Config, ConfigError
from spo.data.model_locations import base_model_location
from spo.evaluation.statistics import paired_win_rate
from spo.models.lora import FULL_UNET_SUBDIR, LORA_WEIGHTS_FILE, lora_weights_file
from spo.tracking.mlflow_tracker import flat_metrics
from spo.tracking.tracker import Tracker

log = logging.getLogger(__name__)

LORA_SUBDIR = "lora"
EVAL_METRICS_FILE = "metrics.json"
EVAL_SCORES_FILE = "scores.parquet"
EVAL_PROTOCOL_FILE = "protocol.json"
REGISTRATION_FILE = "registration.json"
MODEL_NAME_IN_RUN = "spo_lora"
SCORES_ARTIFACT = "registration/candidate_scores.parquet"  # the candidate's per-sample scores, for later gates
KEYS = ("prompt_index", "seed")


def signature(cfg: Config) -> ModelSignature:
    """The flavour's input/output (a prompt in, PNG bytes out) with this profile's protocol as defaults."""
    ev, size = cfg.evaluate, cfg.model.resolution
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]), outputs=Schema([ColSpec(DataType.binary, "image")]),
        params=ParamSchema([ParamSpec("num_inference_steps", DataType.integer, ev.num_inference_steps),
                            ParamSpec("guidance_scale", DataType.double, ev.guidance_scale),
                            ParamSpec("height", DataType.integer, size), ParamSpec("width", DataType.integer, size),
                            ParamSpec("negative_prompt", DataType.string, "")]))


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # first | better | not_better | protocol_differs | no_champion_scores
    metric: str
    champion_version: str | None  # the champion before this decision
    win_rate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    threshold: float | None = None

    def tags(self) -> dict[str, str]:
        return {f"gate.{k}": str(v) for k, v in asdict(self).items() if v is not None}


def read_eval_metrics(eval_dir: Path) -> dict[str, float]:
    """The numeric, finite entries of eval_dir/metrics.json (nested dicts flattened with dots)."""
    path = Path(eval_dir) / EVAL_METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"evaluation metrics not found: {path}")
    try:
        return flat_metrics(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def candidate_model_name(cfg: Config) -> str:
    """The `evaluate.models` entry that is this run's SPO output: the model being registered."""
    for entry in cfg.evaluate.models:
        if entry.run_output == "spo":
            return entry.name
    raise ConfigError("register: no evaluate.models entry has run_output: spo, so this run's SPO model was not "
                      "evaluated and the gate has nothing to compare")


def candidate_scores(eval_dir: Path, model: str, metric: str) -> pd.DataFrame:
    path = Path(eval_dir) / EVAL_SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"evaluation scores not found: {path}")
    table = pd.read_parquet(path)
    if metric not in table.columns:
        raise ConfigError(f"register.primary_metric: {metric} is not among the evaluated scores "
                          f"{[c for c in table.columns if c not in ('model', 'prompt', *KEYS)]}")
    rows = table[table["model"] == model]
    if rows.empty:
        raise ValueError(f"{path}: no rows of model {model!r}")
    return rows.reset_index(drop=True)


def decide(cfg: Config, candidate: pd.DataFrame, champion: pd.DataFrame | None, *, champion_version: str | None,
           same_protocol: bool) -> GateDecision:
    """Promote on a paired win over the champion: rate > threshold and the CI's lower end > 0.5."""
    reg, ev = cfg.register, cfg.evaluate
    metric = reg.primary_metric
    if champion_version is None:
        return GateDecision(True, "first", metric, None)
    if not same_protocol:
        return GateDecision(False, "protocol_differs", metric, champion_version)
    if champion is None:
        return GateDecision(False, "no_champion_scores", metric, champion_version)
    paired = candidate[[*KEYS, metric]].merge(champion[[*KEYS, metric]], on=list(KEYS), suffixes=("", "_champion"))
    if len(paired) != len(candidate):
        return GateDecision(False, "protocol_differs", metric, champion_version)
    win = paired_win_rate(paired[metric].to_numpy(), paired[f"{metric}_champion"].to_numpy(),
                          groups=paired["prompt_index"].to_numpy(), confidence=ev.confidence,
                          n_resamples=ev.bootstrap_resamples, seed=cfg.seed)
    promote = win.value > reg.promote_threshold and win.low > 0.5
    return GateDecision(promote, "better" if promote else "not_better", metric, champion_version,
                        win.value, win.low, win.high, reg.promote_threshold)


def _champion_evidence(client: MlflowClient, name: str, alias: str) -> tuple[Any, pd.DataFrame | None]:
    """(the champion's model version or None, its per-sample scores or None)."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=SCORES_ARTIFACT,
                                                        dst_path=tmp)
            return version, pd.read_parquet(local)
    except (MlflowException, OSError) as err:
        log.warning("champion %s v%s has no per-sample scores (%s): it is kept", name, version.version, err)
        return version, None


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
        tracker: Tracker | None) -> dict[str, float]:
    """Log + register the adapter, alias it candidate, gate the champion, write out_dir/registration.json."""
    lora_dir = Path(spo_dir) / LORA_SUBDIR
    if (lora_dir / FULL_UNET_SUBDIR).is_dir() and not (lora_dir / LORA_WEIGHTS_FILE).is_file():
        reason = ("train_spo.full_finetune wrote a full UNet; MLflow's diffusers flavour registers LoRA adapters "
                  "only. Export a pipeline with `spo export --merged OUT --unet models/spo/lora` instead.")
        log.warning("register: skipped: %s", reason)
        write_json(Path(out_dir) / REGISTRATION_FILE, {"skipped": reason})
        return {"registered_version": 0.0}
    lora_weights_file(lora_dir)  # names the missing file
    metrics = read_eval_metrics(Path(eval_dir))
    protocol_path = Path(eval_dir) / EVAL_PROTOCOL_FILE
    if not protocol_path.is_file():
        raise FileNotFoundError(f"evaluation protocol not found: {protocol_path}")
    fingerprint = json.loads(protocol_path.read_text())["fingerprint"]
    reg = cfg.register
    scores = candidate_scores(Path(eval_dir), candidate_model_name(cfg), reg.primary_metric)
    base = base_model_location(cfg, Path(prepared_dir))
    base = str(Path(base).resolve()) if Path(base).is_dir() else base

    client = MlflowClient()
    champion, champion_scores = _champion_evidence(client, reg.model_name, reg.champion_alias)
    with _model_run(cfg) as active:
        info = mlflow.diffusers.log_model(
            str(lora_dir.resolve()), base, name=MODEL_NAME_IN_RUN, registered_model_name=reg.model_name,
            signature=signature(cfg), metadata={"profile": cfg.profile, "eval_protocol": fingerprint})
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(SCORES_ARTIFACT).name
            scores.to_parquet(local, index=False)
            mlflow.log_artifact(str(local), str(Path(SCORES_ARTIFACT).parent))
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id, run_id=active.info.run_id)
        run_id, parent_id = active.info.run_id, active.data.tags.get("mlflow.parentRunId")
    version = str(info.registered_model_version)
    same = champion is not None and champion.tags.get("eval.protocol_fingerprint") == fingerprint
    decision = decide(cfg, scores, champion_scores, champion_version=str(champion.version) if champion else None,
                      same_protocol=same)
    client.set_registered_model_alias(reg.model_name, reg.alias, version)
    if decision.promote:
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
    revision = info.flavors["diffusers"].get("base_model_revision")  # resolved by the flavour for a hub id
    tags = {"base_model": base, "base_model_revision": revision or "local or unresolved", "profile": cfg.profile,
            "eval.protocol_fingerprint": fingerprint, **decision.tags(),
            **{f"metric.{k}": v for k, v in metrics.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, str(value))
    champion_now = version if decision.promote else decision.champion_version
    registration = {"model_name": reg.model_name, "version": version, "alias": reg.alias,
                    "model_uri": f"models:/{reg.model_name}/{version}",
                    "alias_uri": f"models:/{reg.model_name}@{reg.alias}",
                    "champion_uri": f"models:/{reg.model_name}@{reg.champion_alias}", "champion_version": champion_now,
                    "gate": asdict(decision), "logged_model_uri": info.model_uri, "run_id": run_id,
                    "parent_run_id": parent_id, "base_model": base, "base_model_revision": revision,
                    "eval_metrics": metrics}
    write_json(Path(out_dir) / REGISTRATION_FILE, registration)
    log.info("register: %s v%s is %s; champion: v%s (%s)", reg.model_name, version, reg.alias, champion_now,
             decision.reason)
    result = {"registered_version": float(version), "gate.promoted": float(decision.promote)}
    if decision.win_rate is not None:
        result.update({"gate.win_rate": decision.win_rate, "gate.ci_low": decision.ci_low,
                       "gate.ci_high": decision.ci_high})
    if tracker is not None:
        tracker.log_params({"register.version": version, "register.gate": decision.reason})
    return result


def main(argv: list[str] | None = None) -> None:
    from spo.stages.stage_cli import stage_main

    def body(cfg: Config, args: Any, tracker: Tracker) -> dict[str, float]:
        return run(cfg, prepared_dir=args.prepared_dir, spo_dir=args.spo_dir, eval_dir=args.eval_dir,
                   out_dir=args.out_dir, tracker=tracker)

    stage_main("register", argv, ["prepared_dir", "spo_dir", "eval_dir", "out_dir"], body)


if __name__ == "__main__":
    main()
