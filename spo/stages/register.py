"""Stage `register`: log this run's trained LoRAs (SPO, and DPO when it ran) as MLflow models, register
them as versions of one registered model, and gate the champion.

The model uses MLflow's own `mlflow.diffusers` flavour: the adapter's safetensors plus a reference to the
base pipeline (hub id, with the hub revision the flavour resolves, or a local dir), loaded back with
`DiffusionPipeline` -- SD1.5 and SDXL alike -- and nothing of this package pickled in, so
`mlflow.pyfunc.load_model("models:/NAME@champion")` generates images wherever diffusers and peft are
installed. A local base dir (the digits world) is only referenced: pass
`model_config={"base_model": ...}` when loading it on another machine.

Gate: each new version gets alias `<register.alias>-<method>` (candidate-spo, candidate-dpo) and a
`method` tag. In `evaluate.models` order, alias `register.champion_alias` moves to a version only if its paired win rate on `register.primary_metric` against the current champion -- the same
(prompt, seed) samples, scored the same way, checked by the evaluation protocol's fingerprint -- exceeds
`register.promote_threshold` and the bootstrap CI's lower end exceeds 0.5. The first version becomes
champion. So the champion is whichever method's model won its paired comparison last; DPO is gated
against SPO when SPO was just promoted. Decisions and numbers are written as model-version tags and into
registration.json.
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
from spo.config import Config, ConfigError, EvaluatedModel
from spo.data.model_locations import base_model_location
from spo.evaluation.statistics import paired_win_rate
from spo.models.lora import DISABLED_FILE, FULL_UNET_SUBDIR, LORA_WEIGHTS_FILE, lora_weights_file
from spo.tracking.mlflow_tracker import flat_metrics
from spo.tracking.tracker import Tracker

log = logging.getLogger(__name__)

LORA_SUBDIR = "lora"
EVAL_METRICS_FILE = "metrics.json"
EVAL_SCORES_FILE = "scores.parquet"
EVAL_PROTOCOL_FILE = "protocol.json"
REGISTRATION_FILE = "registration.json"
SCORES_ARTIFACT = "registration/{method}/candidate_scores.parquet"  # a version's per-sample scores, for later gates
LEGACY_SCORES_ARTIFACT = "registration/candidate_scores.parquet"  # where versions before DPO keep them
SCORES_TAG = "gate.scores_artifact"
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


def candidates(cfg: Config) -> list[EvaluatedModel]:
    """The `evaluate.models` entries that are this run's trained models (run_output spo/dpo), in order."""
    found = [entry for entry in cfg.evaluate.models if entry.run_output is not None]
    if not found:
        raise ConfigError("register: no evaluate.models entry has a run_output (spo or dpo), so this run's models "
                          "were not evaluated and the gate has nothing to compare")
    return found


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
            local = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=version.tags.get(SCORES_TAG, LEGACY_SCORES_ARTIFACT), dst_path=tmp)
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


def skipped_full_finetune(lora_dir: Path) -> str | None:
    if (lora_dir / FULL_UNET_SUBDIR).is_dir() and not (lora_dir / LORA_WEIGHTS_FILE).is_file():
        return ("full_finetune wrote a full UNet; MLflow's diffusers flavour registers LoRA adapters only. Export a "
                f"pipeline with `spo export --merged OUT --unet {lora_dir}` instead.")
    return None


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` wrote that the gate reads."""

    eval_dir: Path
    metrics: dict[str, float]
    fingerprint: str


def read_evaluation(eval_dir: Path) -> Evaluation:
    metrics = read_eval_metrics(Path(eval_dir))
    protocol_path = Path(eval_dir) / EVAL_PROTOCOL_FILE
    if not protocol_path.is_file():
        raise FileNotFoundError(f"evaluation protocol not found: {protocol_path}")
    return Evaluation(Path(eval_dir), metrics, json.loads(protocol_path.read_text())["fingerprint"])


def register_candidate(cfg: Config, entry: EvaluatedModel, lora_dir: Path, evaluation: Evaluation, base: str,
                       client: MlflowClient) -> dict[str, Any]:
    """Log + register one trained adapter, alias it `<alias>-<method>`, gate the champion."""
    reg, method = cfg.register, entry.run_output
    alias = f"{reg.alias}-{method}"
    lora_weights_file(lora_dir)  # names the missing file
    scores = candidate_scores(evaluation.eval_dir, entry.name, reg.primary_metric)
    champion, champion_scores = _champion_evidence(client, reg.model_name, reg.champion_alias)
    scores_artifact = SCORES_ARTIFACT.format(method=method)
    with _model_run(cfg) as active:
        info = mlflow.diffusers.log_model(
            str(lora_dir.resolve()), base, name=f"{method}_lora", registered_model_name=reg.model_name,
            signature=signature(cfg),
            metadata={"profile": cfg.profile, "method": method, "eval_protocol": evaluation.fingerprint})
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(scores_artifact).name
            scores.to_parquet(local, index=False)
            mlflow.log_artifact(str(local), str(Path(scores_artifact).parent))
        if evaluation.metrics:
            mlflow.log_metrics(evaluation.metrics, model_id=info.model_id, run_id=active.info.run_id)
        run_id, parent_id = active.info.run_id, active.data.tags.get("mlflow.parentRunId")
    version = str(info.registered_model_version)
    same = champion is not None and champion.tags.get("eval.protocol_fingerprint") == evaluation.fingerprint
    decision = decide(cfg, scores, champion_scores, champion_version=str(champion.version) if champion else None,
                      same_protocol=same)
    client.set_registered_model_alias(reg.model_name, alias, version)
    if decision.promote:
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
    revision = info.flavors["diffusers"].get("base_model_revision")  # resolved by the flavour for a hub id
    tags = {"method": method, "evaluated_as": entry.name, "base_model": base,
            "base_model_revision": revision or "local or unresolved", "profile": cfg.profile,
            "eval.protocol_fingerprint": evaluation.fingerprint, SCORES_TAG: scores_artifact, **decision.tags(),
            **{f"metric.{k}": v for k, v in evaluation.metrics.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, str(value))
    champion_now = version if decision.promote else decision.champion_version
    log.info("register: %s v%s (%s) is %s; champion: v%s (%s)", reg.model_name, version, method, alias,
             champion_now, decision.reason)
    return {"method": method, "evaluated_as": entry.name, "version": version, "alias": alias,
            "model_uri": f"models:/{reg.model_name}/{version}", "alias_uri": f"models:/{reg.model_name}@{alias}",
            "champion_version": champion_now, "gate": asdict(decision), "logged_model_uri": info.model_uri,
            "run_id": run_id, "parent_run_id": parent_id, "base_model_revision": revision}


def run(cfg: Config, *, prepared_dir: Path, spo_dir: Path | None, eval_dir: Path, out_dir: Path,
        tracker: Tracker | None, dpo_dir: Path | None = None) -> dict[str, float]:
    """Register every trained model this run evaluated (SPO, DPO), gate each in turn, write
    out_dir/registration.json. A disabled or fully fine-tuned one is skipped, and the file says why."""
    run_dirs = {"spo": spo_dir, "dpo": dpo_dir}
    evaluation = read_evaluation(Path(eval_dir))
    reg = cfg.register
    base = base_model_location(cfg, Path(prepared_dir))
    base = str(Path(base).resolve()) if Path(base).is_dir() else base
    client = MlflowClient()
    registered, skipped = {}, {}
    for entry in candidates(cfg):
        run_dir = run_dirs.get(entry.run_output)
        if run_dir is None:
            raise ConfigError(f"register: evaluate.models entry {entry.name} is run_output {entry.run_output}, "
                              f"which needs --{entry.run_output}-dir")
        lora_dir = Path(run_dir) / LORA_SUBDIR
        reason = ("train_dpo.enabled is false" if (lora_dir / DISABLED_FILE).is_file()
                  else skipped_full_finetune(lora_dir))
        if reason is not None:
            log.warning("register: %s skipped: %s", entry.name, reason)
            skipped[entry.name] = reason
            continue
        registered[entry.name] = register_candidate(cfg, entry, lora_dir, evaluation, base, client)
    champion = next((r["champion_version"] for r in reversed(registered.values())), None)
    registration = {"model_name": reg.model_name, "champion_version": champion,
                    "champion_uri": f"models:/{reg.model_name}@{reg.champion_alias}", "base_model": base,
                    "eval_metrics": evaluation.metrics, "registered": registered, "skipped": skipped}
    write_json(Path(out_dir) / REGISTRATION_FILE, registration)
    result: dict[str, float] = {"registered_versions": float(len(registered))}
    for name, info in registered.items():
        gate = info["gate"]
        result[f"{name}.version"] = float(info["version"])
        result[f"{name}.gate.promoted"] = float(gate["promote"])
        if gate["win_rate"] is not None:
            result.update({f"{name}.gate.win_rate": gate["win_rate"], f"{name}.gate.ci_low": gate["ci_low"]})
    if tracker is not None:
        tracker.log_params({f"register.{name}.version": info["version"] for name, info in registered.items()}
                           | {f"register.{name}.gate": info["gate"]["reason"] for name, info in registered.items()})
    return result


def main(argv: list[str] | None = None) -> None:
    from spo.stages.stage_cli import stage_main

    def body(cfg: Config, args: Any, tracker: Tracker) -> dict[str, float]:
        return run(cfg, prepared_dir=args.prepared_dir, spo_dir=args.spo_dir, eval_dir=args.eval_dir,
                   out_dir=args.out_dir, tracker=tracker, dpo_dir=args.dpo_dir)

    stage_main("register", argv, ["prepared_dir", "spo_dir", "eval_dir", "out_dir", "dpo_dir?"], body)


if __name__ == "__main__":
    main()
