"""Typed config: no defaults outside profiles/, every bad key, type, range or file named on one line."""

import dataclasses
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from spo import config
from spo.config import (
    ConfigError,
    TrainSPOConfig,
    flat_params,
    load_config,
    load_profile,
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = yaml.safe_load((ROOT / "profiles" / "digits.yaml").read_text())


def write(tmp_path, data, name="p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # one line, always
    return message


# ----------------------------------------------------------------------------------------------------
# profiles


@pytest.mark.parametrize("name", ["digits", "sd15", "sdxl"])
def test_profiles_are_complete_and_valid(name):
    cfg = load_profile(name, require_implemented=False)
    assert cfg.profile == name


def test_published_numbers():
    sd15, sdxl = (load_profile(name, require_implemented=False) for name in ("sd15", "sdxl"))
    s = sd15.train_spo
    assert (s.num_candidates, s.threshold, s.beta, s.clip_eps, s.lora_rank, s.learning_rate) == (4, 0.3, 10.0, 0.1, 4, 6e-5)
    assert (s.eta, s.guidance_scale, s.num_inference_steps, s.branch_start_step, s.num_epochs) == (1.0, 5.0, 20, 4, 10)
    x = sdxl.train_spo
    assert (x.num_candidates, x.threshold, x.lora_rank, x.learning_rate, x.inner_steps) == (2, 0.4, 64, 1e-5, 3)
    assert (sd15.train_spm.learning_rate, sd15.train_spm.max_steps, sdxl.train_spm.max_steps) == (3e-6, 8000, 7000)
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix" and sdxl.train_spm.use_pickscore_labels
    assert sd15.model.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/ is gone from the hub


def test_params_yaml_is_the_digits_profile():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == DIGITS


# ----------------------------------------------------------------------------------------------------
# profiles that cannot run yet


SDXL_MISSING = {"model.architecture": (("sd15",), "the SDXL path")}  # as it was before SDXL landed


def test_every_profile_loads_today():
    assert config.NOT_IMPLEMENTED == {}
    assert [load_profile(name).profile for name in config.profile_names()] == ["digits", "sd15", "sdxl"]


def test_profiles_that_cannot_run_yet_say_what_is_missing(monkeypatch):
    """The mechanism, for the next capability that is not built: one line in NOT_IMPLEMENTED."""
    monkeypatch.setattr(config, "NOT_IMPLEMENTED", {"prepare.dataset": (("digits",), "Pick-a-Pic preparation"),
                                                    **SDXL_MISSING})
    assert error_of(load_profile, "sd15") == (
        "profile sd15 needs Pick-a-Pic preparation (prepare.dataset=pickapic_v1), which is not implemented yet; "
        "only the 'digits' profile runs today")
    assert error_of(load_profile, "sdxl") == (
        "profile sdxl needs Pick-a-Pic preparation (prepare.dataset=pickapic_v1) and the SDXL path "
        "(model.architecture=sdxl), which are not implemented yet; only the 'digits' profile runs today")
    monkeypatch.setattr(config, "NOT_IMPLEMENTED", SDXL_MISSING)
    assert load_profile("sd15").profile == "sd15"
    assert error_of(load_profile, "sdxl") == (
        "profile sdxl needs the SDXL path (model.architecture=sdxl), which is not implemented yet; "
        "the profiles that run today: digits, sd15")


# ----------------------------------------------------------------------------------------------------
# no silent defaults


def test_an_empty_params_file_names_every_missing_section(tmp_path):
    assert error_of(load_config, write(tmp_path, "")) == (
        f"{tmp_path / 'p.yaml'}: missing config keys profile, seed, torch_threads, model, prepare, validate, train_spm, "
        "train_spo, train_dpo, learning_curve, evaluate, register, tracking, cluster")


def test_a_missing_key_is_named(tmp_path):
    data = {**DIGITS, "train_spo": {k: v for k, v in DIGITS["train_spo"].items() if k != "beta"}}
    assert error_of(load_config, write(tmp_path, data)) == f"{tmp_path / 'p.yaml'}: missing config key train_spo.beta"
    del data["validate"]
    assert error_of(config.config_from_dict, data) == "missing config keys validate, train_spo.beta"
    data = {**DIGITS, "prepare": {**DIGITS["prepare"], "oracle": {"temperature": 0.05}}}
    assert error_of(config.config_from_dict, data) == (
        "missing config keys prepare.oracle.alignment_weight, prepare.oracle.aesthetic_weight, prepare.oracle.tie_margin")


def test_sections_have_no_defaults_in_code():
    """Defaults live in profiles/*.yaml only."""
    with pytest.raises(ValueError, match="num_inference_steps"):
        TrainSPOConfig()
    sections = [config.Config, config.OracleConfig, *(t for t in get_type_hints(config.Config).values()
                                                      if dataclasses.is_dataclass(t))]
    assert len(sections) == 13
    sections += [config.Toleration, config.StageResources, config.ClusterStages, config.DistributedJobConfig]
    for cls in sections:
        assert [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING] == [], cls


# ----------------------------------------------------------------------------------------------------
# keys, types, ranges


def test_unknown_key_is_named(tmp_path):
    bad = write(tmp_path, {**DIGITS, "train_spo": {**DIGITS["train_spo"], "betta": 5.0}})
    assert error_of(load_config, bad) == f"{bad}: unknown config key train_spo.betta (did you mean train_spo.beta?)"
    assert error_of(config.config_from_dict, DIGITS, ["nosuch.key=1"]) == "unknown config key nosuch"


@pytest.mark.parametrize("override,message", [
    ("train_spo.beta=abc", "train_spo.beta: expected float, got str 'abc'"),
    ("train_spo.beta=6e-5", "train_spo.beta: expected float, got str '6e-5' (YAML 1.1 reads 6e-5 as a string: write 6.0e-5)"),
    ("train_spo.num_candidates=2.5", "train_spo.num_candidates: expected int, got float 2.5"),
    ("train_spo.num_candidates=true", "train_spo.num_candidates: expected int, got bool True"),
    ("train_spm.use_pickscore_labels=1", "train_spm.use_pickscore_labels: expected bool, got int 1"),
    ("model.dtype=float8", "model.dtype: must be 'float32', 'bfloat16' or 'float16', got 'float8'"),
    ("evaluate.seeds=[0, x]", "evaluate.seeds[1]: expected int, got str 'x'"),
    ("validate=null", "validate: expected a mapping, got NoneType None"),
])
def test_wrong_types_are_named(override, message):
    assert error_of(config.config_from_dict, DIGITS, [override]) == message


@pytest.mark.parametrize("override,message", [
    ("validate.min_rows=-5", "validate.min_rows: must be greater than or equal to 0, got -5"),
    ("validate.max_tie_fraction=.nan", "validate.max_tie_fraction: must be a finite number, got nan"),
    ("validate.max_tie_fraction=1.5", "validate.max_tie_fraction: must be less than or equal to 1, got 1.5"),
    ("train_spo.num_candidates=0", "train_spo.num_candidates: must be greater than or equal to 2, got 0"),
    ("train_spo.beta=-1", "train_spo.beta: must be greater than 0, got -1"),
    ("train_spo.learning_rate=.inf", "train_spo.learning_rate: must be a finite number, got inf"),
    ("train_spo.eta=0.0", "train_spo.eta: must be greater than 0, got 0.0"),
    ("train_spo.clip_eps=1.0", "train_spo.clip_eps: must be less than 1, got 1.0"),
    ("train_spo.threshold=-0.1", "train_spo.threshold: must be greater than or equal to 0, got -0.1"),
    ("train_spo.branch_start_step=20",
     "train_spo.branch_start_step: must be less than train_spo.num_inference_steps (20) for any step to branch, got 20"),
    ("train_spo.max_prompts=0", "train_spo.max_prompts: must be greater than or equal to 1, got 0"),
    ("train_spo.lora_targets=[]", "train_spo.lora_targets: must have at least 1 item after validation, not 0, got []"),
    ("train_spm.eval_timesteps=[0, 1000]", "train_spm.eval_timesteps[1]: must be less than or equal to 999, got 1000"),
    ("evaluate.confidence=1.0", "evaluate.confidence: must be less than 1, got 1.0"),
    ("model.resolution=12", "model.resolution: must be a multiple of 8, got 12"),
    ("prepare.oracle.temperature=0.0", "prepare.oracle.temperature: must be greater than 0, got 0.0"),
    ("register.model_name=''", "register.model_name: must have at least 1 character, got ''"),
    ("seed=-1", "seed: must be greater than or equal to 0, got -1"),
    ("profile=sd3", "profile: must be one of ['digits', 'sd15', 'sdxl'] (the names of profiles/*.yaml), got 'sd3'"),
])
def test_out_of_range_values_are_named(override, message):
    assert error_of(config.config_from_dict, DIGITS, [override]) == message


def test_every_problem_on_one_line(tmp_path):
    assert error_of(config.config_from_dict, DIGITS, ["train_spo.betta=1", "train_spo.beta=-1", "validate.min_rows=x"]) == (
        "unknown config key train_spo.betta (did you mean train_spo.beta?); validate.min_rows: expected int, "
        "got str 'x'; train_spo.beta: must be greater than 0, got -1")


def test_replace_validates_and_sections_are_frozen():
    spo = load_profile("digits").train_spo
    assert dataclasses.replace(spo, beta=5.0).beta == 5.0
    with pytest.raises(ValueError, match="greater than 0"):
        dataclasses.replace(spo, beta=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spo.beta = 1.0


def test_overrides_and_flat_params():
    cfg = load_profile("digits", ["train_spo.beta=5", "evaluate.seeds=[3, 4]"])
    assert cfg.train_spo.beta == 5.0 and isinstance(cfg.train_spo.beta, float) and cfg.evaluate.seeds == (3, 4)
    flat = flat_params(cfg)
    assert flat["train_spo.beta"] == 5.0 and flat["prepare.oracle.temperature"] == cfg.prepare.oracle.temperature
    assert set(config.Config.__dataclass_fields__) == {k.split(".")[0] for k in flat}


# ----------------------------------------------------------------------------------------------------
# files and overrides


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    assert error_of(load_config, tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    bad = write(tmp_path, "a: [1,\n")
    assert error_of(load_config, bad) == (
        f"{bad}: not valid YAML: while parsing a flow node; expected the node content, but found '<stream end>' "
        "(line 2, column 1)")
    listed = write(tmp_path, "- profile: digits\n")
    assert error_of(load_config, listed) == f"{listed}: expected a mapping of sections at the top level, got list"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("profile: digits  # caf\u00e9\n".encode("latin-1"))
    assert error_of(load_config, latin1) == f"{latin1}: not UTF-8 text (byte 22: b'\\xe9')"
    assert error_of(load_profile, "sd3") == "unknown profile 'sd3'; known profiles: ['digits', 'sd15', 'sdxl']"


@pytest.mark.parametrize("override,message", [
    ("validate.min_rows=[1", ("override 'validate.min_rows=[1': not valid YAML: while parsing a flow sequence; "
                              "expected ',' or ']', but got '<stream end>' (line 1, column 3)")),
    ("validate.min_rows", "override 'validate.min_rows': expected section.key=value"),
    ("validate..min_rows=1", "override 'validate..min_rows=1': expected section.key=value"),
])
def test_bad_overrides_are_named(override, message):
    assert error_of(load_profile, "digits", [override]) == message
