"""Typed configuration: one frozen dataclass per `params.yaml` section, validated by pydantic.

`params.yaml` holds the active profile (the embedded `digits` world by default); `profiles/` holds the
complete `digits`, `sd15` and `sdxl` profiles. `spo profile use NAME` copies one over `params.yaml`, so
DVC tracks every knob per section and a changed `train_spo.*` value reruns only from `train_spo`.

The loader is strict and has no defaults: every key must be given (defaults live in `profiles/*.yaml`
only), an unknown key, a missing key, a value of the wrong type or out of range is an error naming the
dotted key (`train_spo.beta: expected float, got str '10'`, `missing config key train_spo.beta`,
`train_spo.num_candidates: must be greater than or equal to 2, got 0`). Floats must be finite.
Overrides use DVC's `-S section.key=value` syntax. The sections are pydantic dataclasses, so
`dataclasses.fields` / `replace` work on them (and `replace` validates too).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from spo.asset_paths import asset_root

PROFILES_DIR = asset_root() / "profiles"  # the checkout's, or an installed copy's (spo/asset_paths.py)

# What a whole profile cannot run yet: dotted key -> (the values that run, what any other value needs);
# the issue that builds one deletes its line. Empty now: every profile loads. What one stage cannot do
# yet is refused by that stage, naming it (train_spo: SDXL/MSPO).
NOT_IMPLEMENTED: dict[str, tuple[tuple[object, ...], str]] = {}


class ConfigError(ValueError):
    """Bad user input (a config file, an override, a path the config names): the `spo` command prints
    the message on one line and exits 2. The message names the dotted key or the file."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A local directory or file named by the config (or by a stage's path arguments) does not exist."""


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _known_profile(name: str) -> str:
    if name not in profile_names():
        raise ValueError(f"must be one of {profile_names()} (the names of profiles/*.yaml)")
    return name


# field types: strict (no "10" -> 10.0, no 1 -> True), floats finite (allow_inf_nan=False below)
Count = Annotated[StrictInt, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegative = Annotated[StrictFloat, Field(ge=0)]
Positive = Annotated[StrictFloat, Field(gt=0)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1)]
OpenFraction = Annotated[StrictFloat, Field(gt=0, lt=1)]
AdamBeta = Annotated[StrictFloat, Field(ge=0, lt=1)]
Name = Annotated[StrictStr, Field(min_length=1)]
Timestep = Annotated[StrictInt, Field(ge=0, le=999)]  # SD schedulers (and the digits one) have T = 1000
Precision = Literal["fp32", "bf16", "fp16"]  # not "no": YAML 1.1 reads a bare no as False (and DVC writes it bare)

section = dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))


@section
class ModelConfig:
    """Which networks to start from: hub ids on a cluster, or None for what `prepare` builds."""

    architecture: Literal["sd15", "sdxl"]
    base_model: Name | None  # hub id or local dir; None = the digits base model `prepare` builds
    vae: Name | None  # replacement VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)
    preference_backbone: Name | None  # PickScore hub id; None = the digits CLIP `prepare` builds
    preference_processor: Name | None  # CLIP processor hub id (PickScore uses laion's ViT-H)
    resolution: Annotated[StrictInt, Field(ge=8, multiple_of=8)]  # the VAE downsamples by up to 8
    dtype: Literal["float32", "bfloat16", "float16"]  # frozen nets; trainables stay fp32


@section
class OracleConfig:
    """The digits world's generic rater: utility = w_align * alignment + w_aes * aesthetic."""

    alignment_weight: NonNegative
    aesthetic_weight: NonNegative
    temperature: Positive  # Bradley-Terry noise of a rater, in utility units (divides the gap)
    tie_margin: NonNegative  # |u0 - u1| below this is reported as a tie (0.5 / 0.5)


@section
class PrepareConfig:
    """Data preparation. `digits` builds the whole embedded world; `pickapic` reads Pick-a-Pic."""

    dataset: Literal["digits", "pickapic_v1", "pickapic_v2"]
    num_pairs: PositiveInt  # digits: pairs generated; Pick-a-Pic: unused (see max_pairs)
    # Pick-a-Pic only. data_dir: a local mirror of the dataset's parquet shards (the hub repo layout,
    # data/{split}-NNNNN-of-MMMMM-*.parquet, or those files flat in the dir); None = the hub
    # (yuvalkirstain/<dataset>, token from HF_TOKEN).
    data_dir: Name | None
    shards: Annotated[tuple[Count, ...], Field(min_length=1)] | None  # train shard numbers NNNNN; None = all
    max_pairs: PositiveInt | None  # stop after this many kept train pairs; None = all
    rows_per_shard: PositiveInt  # rows per prepared parquet shard
    train_prompts: Name | None  # SPO prompt file (JSON list of {caption, trainset_idx}); None = the 4k shipped
    eval_prompts: Name | None  # None = the captions of Pick-a-Pic's validation_unique split
    image_size: Annotated[StrictInt, Field(ge=8, multiple_of=8)]
    vae_train_steps: Count
    unet_train_steps: Count
    backbone_train_steps: Count  # contrastive pre-training of the tiny CLIP (stands in for LAION CLIP)
    train_batch_size: Annotated[StrictInt, Field(ge=2)]  # the VAE trains on halves; CLIP needs negatives
    learning_rate: Positive  # backbone and VAE
    unet_learning_rate: Positive
    oracle: OracleConfig


@section
class ValidateConfig:
    min_rows: Count
    max_tie_fraction: Fraction
    max_bad_fraction: Fraction  # rows quarantined (any rule) above this fraction fail the stage
    max_caption_length: PositiveInt  # characters


@section
class TrainSPMConfig:
    """DESIGN 3.1. `preference_steps` > 0 first fine-tunes the backbone into a PickScore analogue."""

    preference_steps: Count
    preference_learning_rate: Positive
    learning_rate: Positive
    weight_decay: NonNegative
    warmup_steps: Count
    max_steps: Count
    batch_size: PositiveInt
    grad_clip: NonNegative  # 0 disables clipping
    guidance_scale: NonNegative
    use_pickscore_labels: StrictBool  # SDXL recipe: relabel pairs by the backbone on clean images
    pickscore_label_threshold: Fraction  # a gap between two softmax probabilities
    eval_timesteps: Annotated[tuple[Timestep, ...], Field(min_length=1)]
    mixed_precision: Precision
    # a published SPM checkpoint (hub repo, .bin file or dir holding it) or an SPM dir of ours to start
    # from; with max_steps 0 the stage only loads, evaluates and re-saves it. None = the backbone.
    init_from: Name | None
    checkpoint_every: Count  # optimizer steps between resumable checkpoints; 0 = none


@section
class TrainSPOConfig:
    """DESIGN 3.2."""

    seed: Count | None  # of the prompt order, rollouts and LoRA init; None = the top-level seed
    num_inference_steps: PositiveInt
    eta: Annotated[StrictFloat, Field(gt=0, le=1)]  # > 0: the K candidates must differ (sigma_t > 0)
    guidance_scale: NonNegative
    num_candidates: Annotated[StrictInt, Field(ge=2)]  # k: a best and a worst
    branch_start_step: Count  # steps before this index are plain sampling (t > 750)
    inner_steps: Count  # SDXL MSPO: extra stochastic steps per candidate before scoring
    threshold: Fraction  # a gap between two softmax probabilities
    beta: Positive
    clip_eps: OpenFraction
    lora_rank: PositiveInt
    lora_alpha: Positive
    lora_targets: Annotated[tuple[Name, ...], Field(min_length=1)]
    learning_rate: Positive
    adam_beta1: AdamBeta
    adam_beta2: AdamBeta
    adam_epsilon: Positive
    weight_decay: NonNegative
    grad_clip: NonNegative  # 0 disables clipping
    # The batch is set in pairs per optimizer step over all processes (the recipe's unit: SD1.5 40 = 10 per GPU
    # x 4 GPUs); each process accumulates pairs_per_step / world_size pairs in micro-batches of pairs_per_batch.
    prompts_per_round: PositiveInt  # over all processes (SD1.5: 10 per GPU x 4); each rolls out its share
    prompts_per_rollout: PositiveInt  # per process per sampling batch (memory; the recipe's 10 per GPU)
    pairs_per_step: PositiveInt  # pairs per optimizer step, all processes together
    pairs_per_batch: PositiveInt  # micro-batch per process (memory); accumulation follows from the world size
    num_epochs: PositiveInt
    max_prompts: PositiveInt | None  # None = every prompt in the prompt file
    mixed_precision: Precision  # autocast of the UNet calls; log-probs and the SPM always run in fp32
    gradient_checkpointing: bool
    full_finetune: bool  # train every UNet weight (reference: a frozen copy) instead of the LoRA
    attention: Literal["sdpa", "eager"]  # torch's scaled_dot_product_attention, or the plain matmul processor
    channels_last: StrictBool  # UNet and VAE in channels-last memory format (the same maths; for CUDA convs)
    # x̂0 images decoded and scored per call in the rollout (memory: SDXL's VAE at 1024 px); None = all at once
    decode_batch_size: PositiveInt | None
    # Opt-in fast scoring (spo.models.scoring_decoder): an AutoencoderTiny (madebyollin/taesd, taesdxl) or any
    # autoencoder that decodes x̂0 for the SPM instead of the VAE. None = the VAE, as published; changes scores.
    scoring_decoder: Name | None
    lr_warmup_steps: Count  # linear warmup; the recipe's learning rate is constant (0)
    checkpoint_every: Count  # rounds between resumable checkpoints (0: none)
    checkpoint_keep: PositiveInt  # the newest checkpoints kept

    @field_validator("branch_start_step")
    @classmethod
    def _branches_before_the_end(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("num_inference_steps")
        if steps is not None and value >= steps:
            raise ValueError(f"must be less than train_spo.num_inference_steps ({steps}) for any step to branch")
        return value



@section
class TrainDPOConfig:
    """DESIGN 3.3 (Wallace et al. 2023): Diffusion-DPO on the prepared pairs, ties dropped, the baseline SPO
    is compared with. Loss -log σ(-β/2 · ((mse_θ(w) - mse_ref(w)) - (mse_θ(l) - mse_ref(l)))), the 1/2 kept
    as in the paper and its code (diffusers' SD1.5 example drops it: its β 2500 is this β 5000)."""

    enabled: StrictBool  # false: the stage writes a marker, evaluate and register leave DPO out
    seed: Count | None  # of the pair order, t, noise and LoRA init; None = the top-level seed
    beta: Positive
    learning_rate: Positive
    scale_lr: StrictBool  # as published: the rate is learning_rate x pairs_per_step (1e-8 x 2048)
    pairs_per_step: PositiveInt  # pairs per optimizer step over all processes (the paper's 2048)
    pairs_per_batch: PositiveInt  # micro-batch per process (memory); accumulation follows
    max_steps: PositiveInt  # optimizer steps
    lora_rank: PositiveInt
    lora_alpha: Positive
    lora_targets: Annotated[tuple[Name, ...], Field(min_length=1)]
    adam_beta1: AdamBeta
    adam_beta2: AdamBeta
    adam_epsilon: Positive
    weight_decay: NonNegative
    grad_clip: NonNegative  # 0 disables clipping
    lr_warmup_steps: Count  # linear warmup, then constant (the paper: constant_with_warmup, 500)
    mixed_precision: Precision
    gradient_checkpointing: bool
    full_finetune: bool  # the paper's DPO trains every UNet weight (reference: a frozen copy); else a LoRA
    attention: Literal["sdpa", "eager"]
    checkpoint_every: Count  # optimizer steps between resumable checkpoints (0: none)
    checkpoint_keep: PositiveInt

# Scores the evaluation can compute. The first five are the published scorers (spo/evaluation/scorers,
# loaded from `model`/`file`/...); the rest exist on `digits` only: the world's own rater split into its
# terms, and `spm_reward`, the step-aware preference model at t = 0 -- the reward SPO optimised, so a
# check of training, not an independent judge.
PUBLISHED_SCORERS = ("pickscore", "hpsv21", "imagereward", "aesthetic", "clip_score")
DIGITS_SCORERS = ("oracle_aesthetic", "oracle_alignment", "oracle_utility", "spm_reward")
ScorerName = Literal["pickscore", "hpsv21", "imagereward", "aesthetic", "clip_score",
                     "oracle_aesthetic", "oracle_alignment", "oracle_utility", "spm_reward"]
RunOutput = Literal["spo", "dpo"]


@section
class ScorerEntry:
    """One score of the evaluation. The location keys name what a published scorer loads (hub id or local
    dir, a file in it, a processor/tokenizer kept elsewhere, the open_clip architecture); list entries may
    leave out the keys they do not use (the one place the loader has defaults: None)."""

    name: ScorerName
    model: Name | None = None
    file: Name | None = None
    processor: Name | None = None
    tokenizer: Name | None = None
    arch: Name | None = None

    @model_validator(mode="after")
    def _location_fits_the_name(self) -> "ScorerEntry":
        if self.name in PUBLISHED_SCORERS and self.model is None:
            raise ValueError(f"scorer {self.name} needs a model (hub id or local dir)")
        given = [k for k in ("model", "file", "processor", "tokenizer", "arch") if getattr(self, k) is not None]
        if self.name in DIGITS_SCORERS and given:
            raise ValueError(f"scorer {self.name} is built into the digits world and loads nothing, got {given}")
        return self


@section
class EvaluatedModel:
    """One column of the comparison: a base pipeline (hub id or dir; None = this run's `model.base_model`,
    or the digits base `prepare` builds), optionally with a LoRA (dir or hub id) or a full UNet (a UNet dir,
    a pipeline dir/hub id whose unet/ is taken), or `run_output`: this run's trained model (spo: the
    train_spo output, a LoRA or a full UNet). Keys left out are None."""

    name: Annotated[StrictStr, Field(min_length=1, pattern=r"^[A-Za-z0-9_-]+$")]
    base: Name | None = None
    lora: Name | None = None
    unet: Name | None = None
    run_output: RunOutput | None = None

    @model_validator(mode="after")
    def _one_change(self) -> "EvaluatedModel":
        given = [k for k in ("lora", "unet", "run_output") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"model {self.name}: give one of lora, unet, run_output, not {given}")
        return self


def _distinct_names(entries: tuple, what: str) -> tuple:
    names = [e.name for e in entries]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"{what} names must be distinct, {doubled} repeats")
    return entries


@section
class EvaluateConfig:
    """DESIGN 3.4: every model samples the same (prompt, seed) list; paired statistics over it."""

    num_prompts: PositiveInt
    seeds: Annotated[tuple[Count, ...], Field(min_length=1)]
    num_inference_steps: PositiveInt
    guidance_scale: NonNegative
    eta: Fraction
    grid_prompts: Count
    confidence: OpenFraction
    bootstrap_resamples: Annotated[StrictInt, Field(ge=100)]
    batch_size: PositiveInt  # images per generation batch (per worker process on CPU)
    score_batch_size: PositiveInt
    # the first model is the baseline every other is compared with (win rates "<model>_vs_<first>")
    models: Annotated[tuple[EvaluatedModel, ...], Field(min_length=2),
                      AfterValidator(lambda v: _distinct_names(v, "evaluate.models"))]
    scorers: Annotated[tuple[ScorerEntry, ...], Field(min_length=1),
                       AfterValidator(lambda v: _distinct_names(v, "evaluate.scorers"))]



def _no_training_reward(entries: tuple) -> tuple:
    if any(e.name == "spm_reward" for e in entries):
        raise ValueError("spm_reward is SPO's own training reward: a curve comparing SPO and DPO by it is not fair")
    return _distinct_names(entries, "learning_curve.scorers")


@section
class LearningCurveConfig:
    """Score vs training wall time, for SPO and DPO alike: before training and at `points` evenly spaced
    moments, the model in training samples the first `num_prompts` eval prompts (DDIM, η = 0, one `seed`)
    and `scorers` rate them. The time spent there is not counted as training time. Its own keys, not
    evaluate's: a changed evaluation protocol must not rerun training."""

    points: Count  # 0: no curve
    num_prompts: PositiveInt
    seed: Count
    num_inference_steps: PositiveInt
    guidance_scale: NonNegative
    batch_size: PositiveInt  # images per sampling and scoring batch
    scorers: Annotated[tuple[ScorerEntry, ...], Field(min_length=1), AfterValidator(_no_training_reward)]

@section
class RegisterConfig:
    """The registry gate: this run's model becomes version `alias` (candidate); alias `champion` moves to it
    only if its paired win rate on `primary_metric` vs the current champion exceeds `promote_threshold` and
    the CI's lower end exceeds 0.5. The first registered version becomes champion."""

    model_name: Name
    alias: Name
    champion_alias: Name
    primary_metric: ScorerName
    promote_threshold: Annotated[StrictFloat, Field(ge=0.5, lt=1)]


@section
class TrackingConfig:
    experiment: Name


# Kubernetes quantities as kfp-kubernetes writes them ("8", "500m", "64G", "64Gi")
Quantity = Annotated[StrictStr, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]
Label = Annotated[StrictStr, Field(min_length=1, max_length=316, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")]


def _server_tracking_uri(value: str | None) -> str | None:
    """Pods cannot share a sqlite file or a local directory: on a cluster MLflow must be a server."""
    if value is not None and not value.startswith(("http://", "https://", "databricks")):
        raise ValueError("must be an MLflow server (http(s)://host:port or databricks): every pod of a run "
                         "writes to it, and a sqlite file or local directory is private to one pod")
    return value


@section
class Toleration:
    key: Name
    operator: Literal["Exists", "Equal"]
    value: StrictStr | None  # null with operator Exists
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None  # null: every effect


@section
class StageResources:
    """What one KFP task asks of Kubernetes. gpus > 1 runs the stage in that many processes on one node
    (accelerate); nodes > 1 (training stages only) runs it as a Kubeflow Trainer TrainJob of that many
    nodes of `gpus` each."""

    gpus: Count
    nodes: PositiveInt
    cpu: Quantity  # request
    memory: Quantity  # request
    cpu_limit: Quantity | None
    memory_limit: Quantity | None


@section
class ClusterStages:
    prepare: StageResources
    validate: StageResources
    train_spm: StageResources
    train_spo: StageResources
    train_dpo: StageResources
    evaluate: StageResources
    register: StageResources

    @model_validator(mode="after")
    def _multi_node_only_for_training(self):
        for name in ("prepare", "validate", "evaluate", "register"):
            if getattr(self, name).nodes != 1:
                raise ValueError(f"{name}.nodes: only the training stages run on more than one node")
        for name in ("train_spm", "train_spo", "train_dpo"):
            stage = getattr(self, name)
            if stage.nodes > 1 and stage.gpus < 1:
                raise ValueError(f"{name}: a multi-node TrainJob needs gpus >= 1 per node")
        return self


@section
class DistributedJobConfig:
    """How a stage with nodes > 1 runs: a Kubeflow Trainer v2 TrainJob (Trainer >= 2.2), or a v1
    PyTorchJob (Training Operator 1.9) on older clusters."""

    kind: Literal["TrainJob", "PyTorchJob"]
    runtime: Name  # the ClusterTrainingRuntime of a TrainJob
    timeout_s: PositiveInt  # the job's activeDeadlineSeconds and the launcher's wait


@section
class ClusterConfig:
    """Compile-time settings of the Kubeflow pipeline (`spo pipeline compile`): not read by any stage, so
    changing them never changes a stage's output or its cache key. Secrets are named, never given: the
    values stay in Kubernetes and reach pods as env."""

    image: Name  # `spo pipeline compile --image` overrides it
    mlflow_tracking_uri: Annotated[Name | None, AfterValidator(_server_tracking_uri)]  # None: run-local only
    mlflow_credentials_secret: Name | None  # keys `username`, `password` -> MLFLOW_TRACKING_USERNAME/PASSWORD
    hf_token_secret: Name | None  # key `token` -> HF_TOKEN
    kfp_ui_url: Name | None  # tags each MLflow run with a link to its KFP run
    pvc: Name | None  # ReadWriteMany claim for the HF cache and training checkpoints (retries resume there)
    mount_path: Name
    gpu_resource: Name  # the accelerator type KFP requests, e.g. nvidia.com/gpu
    gpu_node_selector: dict[Label, Label]
    gpu_tolerations: tuple[Toleration, ...]
    shm_size: Quantity  # memory-backed /dev/shm of GPU tasks (NCCL, data loaders)
    training_retries: Count
    retry_backoff_s: PositiveInt
    distributed: DistributedJobConfig
    stages: ClusterStages

    @model_validator(mode="after")
    def _multi_node_needs_a_shared_volume(self):
        multi = [name for name in ("train_spm", "train_spo", "train_dpo") if getattr(self.stages, name).nodes > 1]
        if multi and not self.pvc:
            raise ValueError(f"stages.{multi[0]}.nodes > 1 needs pvc: a ReadWriteMany claim the nodes share "
                             "(inputs, checkpoints, the output)")
        return self


@section
class Config:
    profile: Annotated[StrictStr, AfterValidator(_known_profile)]
    seed: Count
    # CPU threads torch uses in every stage. Float sums round differently at another thread count, so a
    # fixed number (not the machine's core count) makes a CPU run's numbers the same on every machine of
    # the same CPU family. null: torch's default (GPU nodes, where the CPU does little).
    torch_threads: PositiveInt | None
    model: ModelConfig
    prepare: PrepareConfig
    validate: ValidateConfig
    train_spm: TrainSPMConfig
    train_spo: TrainSPOConfig
    train_dpo: TrainDPOConfig
    learning_curve: LearningCurveConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    tracking: TrackingConfig
    cluster: ClusterConfig


# ----------------------------------------------------------------------------------------------------
# error messages: pydantic's errors, one line, each naming the dotted key

_EXPECTED = {"float_type": "float", "int_type": "int", "bool_type": "bool", "string_type": "str",
             "tuple_type": "a list", "dataclass_type": "a mapping"}


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(loc: tuple) -> str:
    cls = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an entry of a list section: its element type
            continue
        cls = get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):  # tuple[Entry, ...]: the entry's fields
            cls = next(a for a in get_args(cls) if dataclasses.is_dataclass(a))
    close = difflib.get_close_matches(str(loc[-1]), [f.name for f in dataclasses.fields(cls)], n=1)
    return f" (did you mean {_dotted((*loc[:-1], close[0]))}?)" if close else ""


def _is_number(value: Any) -> bool:
    try:
        return isinstance(value, str) and bool(float(value) or True)
    except ValueError:
        return False


def _problem(error: dict) -> str:
    key, kind, value = _dotted(error["loc"]), error["type"], error.get("input")
    if kind in _EXPECTED:
        hint = " (YAML 1.1 reads 6e-5 as a string: write 6.0e-5)" if kind == "float_type" and _is_number(value) else ""
        return f"{key}: expected {_EXPECTED[kind]}, got {type(value).__name__} {_shown(value)}{hint}"
    message = str(error["ctx"]["error"]) if kind == "value_error" else re.sub(r"^\w+ should", "must", error["msg"])
    return f"{key}: {message}, got {_shown(value)}"


def describe(error: ValidationError) -> str:
    """Every problem of a ValidationError on one line: unknown keys, missing keys, then bad values."""
    errors = error.errors(include_url=False)
    # a list whose bad entry was dropped is then "too short": an echo of that entry's error, not news
    errors = [e for e in errors if not (e["type"] == "too_short" and any(
        o is not e and o["loc"][:len(e["loc"])] == e["loc"] and len(o["loc"]) > len(e["loc"]) for o in errors))]
    unknown = [f"unknown config key {_dotted(e['loc'])}{_did_you_mean(e['loc'])}" for e in errors
               if e["type"] == "unexpected_keyword_argument"]
    missing = [_dotted(e["loc"]) for e in errors if e["type"] == "missing"]
    missing_text = [f"missing config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else []
    values = [_problem(e) for e in errors if e["type"] not in ("missing", "unexpected_keyword_argument")]
    return "; ".join(unknown + missing_text + values)


# ----------------------------------------------------------------------------------------------------
# loading

_CONFIG = TypeAdapter(Config)


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with a parse error as one line naming `where` and the line/column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        what = "; ".join(s for s in (getattr(err, "context", None), getattr(err, "problem", None)) if s)
        if mark is None or not what:
            raise ConfigError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
        raise ConfigError(f"{where}: not valid YAML: {what} (line {mark.line + 1}, column {mark.column + 1})") from None


def read_params(path: str | Path) -> dict:
    """A params file as a raw mapping; a missing or unreadable file, bad YAML, non-UTF-8 bytes or a top
    level that is not a mapping is a ConfigError naming the file. An empty file is {}."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    data = _yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    return path, _yaml(raw, f"override {text!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply DVC-style `-S section.key=value` overrides (values parsed as YAML) to a raw mapping."""
    data = dict(data)
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return data


def _parse(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return _CONFIG.validate_python(data)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def unimplemented(cfg: Config) -> list[str]:
    """What `cfg` asks for that is not built yet (NOT_IMPLEMENTED), e.g. ["the SDXL path (model.architecture=sdxl)"]."""
    flat = flat_params(cfg)
    return [f"{what} ({key}={flat[key]})" for key, (runs, what) in NOT_IMPLEMENTED.items() if flat[key] not in runs]


def _runnable_profiles() -> list[str]:
    runnable = []
    for name in profile_names():
        try:
            if not unimplemented(load_profile(name, require_implemented=False)):
                runnable.append(name)
        except ConfigError:
            pass
    return runnable


def check_implemented(cfg: Config) -> Config:
    """Raise a ConfigError saying what is missing if `cfg` needs something that is not built yet."""
    needs = unimplemented(cfg)
    if needs:
        runnable = _runnable_profiles()
        runs = (f"only the {runnable[0]!r} profile runs today" if len(runnable) == 1
                else f"the profiles that run today: {', '.join(runnable) or 'none'}")
        raise ConfigError(f"profile {cfg.profile} needs {' and '.join(needs)}, which "
                          f"{'is' if len(needs) == 1 else 'are'} not implemented yet; {runs}")
    return cfg


def config_from_dict(data: dict, overrides: list[str] | None = None, *, require_implemented: bool = True) -> Config:
    """Validate a raw mapping (every key required). `require_implemented=False` also accepts a config the
    code cannot run yet (tests of the published numbers, stage guards)."""
    cfg = _parse(apply_overrides(data if data is not None else {}, overrides or []))
    return check_implemented(cfg) if require_implemented else cfg


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None, *,
                require_implemented: bool = True) -> Config:
    """Load and validate a params file; errors in the file are prefixed with its path."""
    data = apply_overrides(read_params(path), overrides or [])
    try:
        cfg = _parse(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return check_implemented(cfg) if require_implemented else cfg


class AbsentSection:
    """A config section a stage was not given (see `config_view`). Reading from it means the stage reads
    a section its STAGE_SECTIONS entry does not list: a bug, named here, not a silent default."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_section", name)

    def __getattr__(self, attr: str):
        raise AttributeError(f"config section {self._section!r} was not passed to this stage (add it to "
                             f"spo.stages.STAGE_SECTIONS), but {self._section}.{attr} was read")

    def __repr__(self) -> str:
        return f"AbsentSection({self._section!r})"


def view_data(data: dict, sections: tuple[str, ...]) -> dict:
    """The raw mapping of a config view: only `sections` (all of which must be present)."""
    missing = [name for name in sections if name not in data]
    if missing:
        raise ConfigError(f"missing config key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return {name: data[name] for name in sections}


def config_view(data: dict, sections: tuple[str, ...]) -> Config:
    """A Config holding only `sections`, each validated as strictly as in a whole config; the others are
    AbsentSection. KFP passes each stage such a view (its STAGE_SECTIONS), so the stage's cache key
    depends only on what shapes its output."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - names)
    extra = sorted(set(data) & names - set(sections))
    if unknown or extra:
        raise ConfigError("; ".join([f"unknown config key {k}" for k in unknown] + (
            [f"config key{'s' if len(extra) > 1 else ''} {', '.join(extra)} not part of this view "
             f"({', '.join(sections)})"] if extra else [])))
    view_data(data, sections)
    hints = get_type_hints(Config, include_extras=True)
    cfg = object.__new__(Config)
    problems = []
    for field in dataclasses.fields(Config):
        if field.name not in sections:
            object.__setattr__(cfg, field.name, AbsentSection(field.name))
            continue
        try:
            value = TypeAdapter(hints[field.name]).validate_python(data[field.name])  # sections: own config
        except ValidationError as err:
            problems.append(describe_at(field.name, err))
            continue
        object.__setattr__(cfg, field.name, value)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def describe_at(name: str, error: ValidationError) -> str:
    """`describe` for an error of one section validated alone: dotted keys start with the section."""
    errors = error.errors(include_url=False)
    for e in errors:
        e["loc"] = (name, *e["loc"])
    return "; ".join(f"unknown config key {_dotted(e['loc'])}" if e["type"] == "unexpected_keyword_argument"
                     else f"missing config key {_dotted(e['loc'])}" if e["type"] == "missing" else _problem(e)
                     for e in errors)


def profile_path(name: str) -> Path:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; known profiles: {profile_names()}")
    return path


def load_profile(name: str, overrides: list[str] | None = None, *, require_implemented: bool = True) -> Config:
    return load_config(profile_path(name), overrides, require_implemented=require_implemented)


def training_seed(run: Config, section: TrainSPOConfig | TrainDPOConfig) -> int:
    """A training stage's own seed, or the top-level one: seeds of SPO and DPO vary apart from the data's."""
    return section.seed if section.seed is not None else run.seed


def flat_params(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`train_spo.beta`-style flat view, for MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, AbsentSection):  # a stage's config view (config_view)
            continue
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flat_params(value, key + "."))
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, entry in enumerate(value):  # a list section (evaluate.models): one param per entry, by name
                out[f"{key}.{getattr(entry, 'name', i)}"] = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(entry).items()
                                                       if v is not None and k != "name") or "-"
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
