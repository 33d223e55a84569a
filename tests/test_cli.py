"""The `spo` command: stage dispatch, config errors naming the key, profiles, pipeline dispatch."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, good_pairs_frame

from spo import cli

PARAMS = str(REPO_ROOT / "params.yaml")


def test_stage_config_error_exits_2_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train_spo", "--params", PARAMS, "-S", "train_spo.betta=1", "--prepared-dir", str(tmp_path),
                  "--spm-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train_spo.betta" in err and "config error" in err
    assert not (tmp_path / "out").exists()


def test_wrong_type_through_python_m_spo_cli(tmp_path):
    """A fresh process, as dvc.yaml runs stages (`python -m spo.cli STAGE`)."""
    result = subprocess.run([sys.executable, "-m", "spo.cli", "validate", "--params", PARAMS,
                             "-S", "validate.min_rows=many", "--pairs", "x.parquet", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "validate.min_rows: expected int, got str 'many'" in result.stderr


def test_stage_dispatch_runs_the_stage(write_pairs, tmp_path, mlflow_db):
    path = write_pairs(good_pairs_frame())
    assert cli.main(["validate", "--params", PARAMS, "-S", "validate.min_rows=10", "--pairs", str(path),
                     "--out-dir", str(tmp_path / "report")]) == 0
    assert yaml.safe_load((tmp_path / "report" / "report.json").read_text())["success"] is True


def test_unknown_command_exits_2(capsys):
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_profile_list_and_show(tmp_path, capsys):
    assert cli.main(["profile", "list"]) == 0
    assert capsys.readouterr().out.split() == ["digits", "sd15", "sdxl"]
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text().replace("beta: 10.0", "beta: 5.0"))
    assert cli.main(["profile", "show", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("profile: digits") and "-  beta: 10.0" in out and "+  beta: 5.0" in out


def test_profile_use_copies_the_profile(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    assert cli.main(["profile", "use", "sd15", "--params", str(params)]) == 0
    assert params.read_text() == (REPO_ROOT / "profiles" / "sd15.yaml").read_text()
    assert list(tmp_path.iterdir()) == [params]  # no temp files left behind


def test_profile_use_refuses_a_bad_profile_and_keeps_params(tmp_path, monkeypatch, capsys):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.yaml").write_text("profile: broken\ntrain_spo:\n  beta: ten\n")
    monkeypatch.setattr(cli, "PROFILES_DIR", profiles)
    monkeypatch.setattr("spo.config.PROFILES_DIR", profiles)
    params = tmp_path / "params.yaml"
    params.write_text("profile: digits\n")
    assert cli.main(["profile", "use", "broken", "--params", str(params)]) == 2
    assert "train_spo.beta" in capsys.readouterr().err
    assert cli.main(["profile", "use", "missing", "--params", str(params)]) == 2
    assert "unknown profile 'missing'" in capsys.readouterr().err
    assert params.read_text() == "profile: digits\n"


def test_pipeline_dispatch_compiles(tmp_path):
    pytest.importorskip("kfp")
    out = tmp_path / "spo.yaml"
    assert cli.main(["pipeline", "compile", "--params", PARAMS, "--output", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["pipelineInfo"]["name"] == "spo-pipeline"


def test_component_image_comes_from_the_environment(tmp_path):
    pytest.importorskip("kfp")
    out = tmp_path / "spo.yaml"
    env = {"SPO_COMPONENT_IMAGE": "registry.example/spo:test", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "spo.cli", "pipeline", "compile", "--params", PARAMS, "--output", str(out)],
                   check=True, env=env, cwd=REPO_ROOT, capture_output=True)
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/spo:test"}


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert len(quickstart) == 2 and "dvc repro" in quickstart[0]
    assert ci[-1] == quickstart[1] == "python -m pytest -q"
