"""Typed config: every profile loads; unknown keys and wrong types name the dotted key."""

from pathlib import Path

import pytest
import yaml

from spo.config import ConfigError, flat_params, load_config, load_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["digits", "sd15", "sdxl"])
def test_profiles_load(name):
    cfg = load_profile(name)
    assert cfg.profile == name


def test_published_numbers():
    sd15, sdxl = load_profile("sd15"), load_profile("sdxl")
    s = sd15.train_spo
    assert (s.num_candidates, s.threshold, s.beta, s.clip_eps, s.lora_rank, s.learning_rate) == (4, 0.3, 10.0, 0.1, 4, 6e-5)
    assert (s.eta, s.guidance_scale, s.num_inference_steps, s.branch_start_step, s.num_epochs) == (1.0, 5.0, 20, 4, 10)
    x = sdxl.train_spo
    assert (x.num_candidates, x.threshold, x.lora_rank, x.learning_rate, x.inner_steps) == (2, 0.4, 64, 1e-5, 3)
    assert (sd15.train_spm.learning_rate, sd15.train_spm.max_steps, sdxl.train_spm.max_steps) == (3e-6, 8000, 7000)
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix" and sdxl.train_spm.use_pickscore_labels


def test_params_yaml_is_the_digits_profile():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load((ROOT / "profiles/digits.yaml").read_text())


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train_spo:\n  betta: 5.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key train_spo\.betta"):
        load_config(bad)


@pytest.mark.parametrize("override,match", [
    ("train_spo.beta=abc", r"train_spo\.beta: expected float, got str"),
    ("train_spo.num_candidates=2.5", r"train_spo\.num_candidates: expected int"),
    ("model.dtype=float8", r"model\.dtype: expected one of"),
    ("evaluate.seeds=[0, x]", r"evaluate\.seeds\[1\]: expected int"),
    ("nosuch.key=1", r"unknown config key nosuch"),
])
def test_wrong_types_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_profile("digits", [override])


def test_overrides_and_flat_params():
    cfg = load_profile("digits", ["train_spo.beta=5", "evaluate.seeds=[3, 4]"])
    assert cfg.train_spo.beta == 5.0 and cfg.evaluate.seeds == (3, 4)
    flat = flat_params(cfg)
    assert flat["train_spo.beta"] == 5.0 and flat["prepare.oracle.temperature"] == cfg.prepare.oracle.temperature


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown profile"):
        load_profile("sd3")
