"""Typed configuration: one frozen dataclass per `params.yaml` section.

`params.yaml` holds the active profile (the embedded `digits` world by default); `profiles/` holds the
complete `digits`, `sd15` and `sdxl` profiles. `spo profile use NAME` copies one over `params.yaml`, so
DVC tracks every knob per section and a changed `train_spo.*` value reruns only from `train_spo`.

The loader is strict: an unknown key or a value of the wrong type is an error naming the dotted key
(`train_spo.beta: expected float, got str '10'`). Overrides use DVC's `-S section.key=value` syntax.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    """Which networks to start from: hub ids on a cluster, or None for what `prepare` builds."""

    architecture: Literal["sd15", "sdxl"] = "sd15"
    base_model: str | None = None  # hub id or local dir; None = the digits base model `prepare` builds
    vae: str | None = None  # replacement VAE (SDXL: madebyollin/sdxl-vae-fp16-fix)
    preference_backbone: str | None = None  # PickScore hub id; None = the digits CLIP `prepare` builds
    preference_processor: str | None = None  # CLIP processor hub id (PickScore uses laion's ViT-H)
    resolution: int = 512
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # frozen nets; trainables stay fp32


@dataclass(frozen=True)
class OracleConfig:
    """The digits world's generic rater: utility = w_align * alignment + w_aes * aesthetic."""

    alignment_weight: float = 1.0
    aesthetic_weight: float = 1.0
    temperature: float = 0.05  # Bradley-Terry noise of a rater, in utility units
    tie_margin: float = 0.02  # |u0 - u1| below this is reported as a tie (0.5 / 0.5)


@dataclass(frozen=True)
class PrepareConfig:
    """Data preparation. `digits` builds the whole embedded world; `pickapic` reads Pick-a-Pic."""

    dataset: Literal["digits", "pickapic_v1", "pickapic_v2"] = "digits"
    num_pairs: int = 2000
    image_size: int = 16
    vae_train_steps: int = 600
    unet_train_steps: int = 1000
    backbone_train_steps: int = 300  # contrastive pre-training of the tiny CLIP (stands in for LAION CLIP)
    train_batch_size: int = 128
    learning_rate: float = 2.0e-3
    oracle: OracleConfig = field(default_factory=OracleConfig)


@dataclass(frozen=True)
class ValidateConfig:
    min_rows: int = 10
    max_tie_fraction: float = 0.9


@dataclass(frozen=True)
class TrainSPMConfig:
    """DESIGN 3.1. `preference_steps` > 0 first fine-tunes the backbone into a PickScore analogue."""

    preference_steps: int = 0
    preference_learning_rate: float = 1.0e-3
    learning_rate: float = 3.0e-6
    weight_decay: float = 0.3
    warmup_steps: int = 500
    max_steps: int = 8000
    batch_size: int = 16
    grad_clip: float = 1.0
    guidance_scale: float = 5.0
    use_pickscore_labels: bool = False  # SDXL recipe: relabel pairs by the backbone on clean images
    pickscore_label_threshold: float = 0.1
    eval_timesteps: tuple[int, ...] = (0, 251, 501, 701, 951)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"


@dataclass(frozen=True)
class TrainSPOConfig:
    """DESIGN 3.2 (SD1.5 recipe by default)."""

    num_inference_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    num_candidates: int = 4  # k
    branch_start_step: int = 4  # steps before this index are plain sampling (t > 750)
    inner_steps: int = 0  # SDXL MSPO: extra stochastic steps per candidate before scoring
    threshold: float = 0.3
    beta: float = 10.0
    clip_eps: float = 0.1
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    learning_rate: float = 6.0e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    weight_decay: float = 1.0e-4
    grad_clip: float = 1.0
    prompts_per_round: int = 10
    pairs_per_batch: int = 10
    gradient_accumulation_steps: int = 1
    num_epochs: int = 10
    max_prompts: int | None = None  # None = every prompt in the prompt file
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"


@dataclass(frozen=True)
class EvaluateConfig:
    """DESIGN 3.4: fixed seeds shared by every model compared."""

    num_prompts: int = 500
    seeds: tuple[int, ...] = (0,)
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 0.0
    grid_prompts: int = 8
    confidence: float = 0.95


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "spo-lora"
    alias: str = "candidate"


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "spo"


@dataclass(frozen=True)
class Config:
    profile: str = "digits"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    train_spm: TrainSPMConfig = field(default_factory=TrainSPMConfig)
    train_spo: TrainSPOConfig = field(default_factory=TrainSPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------------
# loading


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to `hint`, or raise ConfigError naming `key`."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_value(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: may not be null")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{key}: expected one of {list(get_args(hint))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_hint = get_args(hint)[0]
        return tuple(_check_value(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "<top level>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(f"unknown config key {dotted} (allowed in {where}: {sorted(names)})")
    kwargs = {k: _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


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


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    return _build(Config, apply_overrides(data or {}, overrides or []))


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Load and validate a params file. A missing file or bad YAML is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def load_profile(name: str, overrides: list[str] | None = None) -> Config:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}; known profiles: {known}")
    return load_config(path, overrides)


def flat_params(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`train_spo.beta`-style flat view, for MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flat_params(value, key + "."))
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out
