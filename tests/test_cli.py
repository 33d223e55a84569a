"""The `spo` command: stage dispatch, config errors naming the key, profiles, pipeline dispatch."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, good_pairs_frame

from spo import cli, config

PARAMS = str(REPO_ROOT / "params.yaml")


def test_stage_config_error_exits_2_naming_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train_spo", "--params", PARAMS, "-S", "train_spo.betta=1", "--prepared-dir", str(tmp_path),
                  "--spm-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"spo train_spo: {PARAMS}: unknown config key train_spo.betta "
                                       "(did you mean train_spo.beta?)\n")
    assert not (tmp_path / "out").exists()


def test_wrong_type_through_python_m_spo_cli(tmp_path):
    """A fresh process, as dvc.yaml runs stages (`python -m spo.cli STAGE`): one line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "spo.cli", "validate", "--params", PARAMS,
                             "-S", "validate.min_rows=many", "--pairs-dir", "x", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr == f"spo validate: {PARAMS}: validate.min_rows: expected int, got str 'many'\n"


def bad_params(tmp_path, kind: str) -> tuple[str, str]:
    """(params file, the error naming it) for a params file that is broken in one way."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "list":
        path.write_text("- profile: digits\n")
        return str(path), f"{path}: expected a mapping of sections at the top level, got list"
    if kind == "latin1":
        path.write_bytes(b"profile: digits  # caf\xe9\n")
        return str(path), f"{path}: not UTF-8 text (byte 22: b'\\xe9')"
    if kind == "yaml":
        path.write_text("profile: digits\nseed: [42\n")
        return str(path), (f"{path}: not valid YAML: while parsing a flow sequence; expected ',' or ']', "
                           "but got '<stream end>' (line 3, column 1)")
    if kind == "missing":
        return str(path), f"config file not found: {path}"
    raise ValueError(kind)


BAD_OVERRIDE = ("validate.min_rows=[1", ("override 'validate.min_rows=[1': not valid YAML: while parsing a flow "
                                         "sequence; expected ',' or ']', but got '<stream end>' (line 1, column 3)"))


@pytest.mark.parametrize("kind", ["list", "latin1", "yaml", "missing", "override", "range"])
def test_bad_input_to_a_stage_is_one_line_exit_2(kind, tmp_path, capsys):
    params, overrides = PARAMS, []
    if kind == "override":
        overrides, message = ["-S", BAD_OVERRIDE[0]], BAD_OVERRIDE[1]
    elif kind == "range":
        overrides, message = ["-S", "validate.max_tie_fraction=.nan"], f"{PARAMS}: validate.max_tie_fraction: must be a finite number, got nan"
    else:
        params, message = bad_params(tmp_path, kind)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", "--params", params, *overrides, "--pairs-dir", "x", "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"spo validate: {message}\n"


def test_a_missing_model_directory_is_one_line_exit_2(tmp_path, capsys, mlflow_db):
    """Found inside the stage (the model loader), not at load time: a cluster path need not exist here."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train_spo", "--params", PARAMS, "-S", "model.base_model=/nonexistent", "--prepared-dir",
                  str(tmp_path), "--spm-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "spo train_spo: base model: local model directory not found: /nonexistent\n"
    assert not (tmp_path / "out" / "lora").exists()


def test_stage_dispatch_runs_the_stage(write_pairs, tmp_path, mlflow_db):
    path = write_pairs(good_pairs_frame())
    assert cli.main(["validate", "--params", PARAMS, "-S", "validate.min_rows=10", "--pairs-dir", str(path),
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


def test_profile_use_copies_the_profile(tmp_path, monkeypatch):
    monkeypatch.setattr("spo.config.NOT_IMPLEMENTED", {})  # as if sd15 ran today
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    assert cli.main(["profile", "use", "sd15", "--params", str(params)]) == 0
    assert params.read_text() == (REPO_ROOT / "profiles" / "sd15.yaml").read_text()
    assert list(tmp_path.iterdir()) == [params]  # no temp files left behind


NOT_BUILT = {"prepare.dataset": (("digits",), "Pick-a-Pic preparation"),
             "model.architecture": (("sd15",), "the SDXL path")}  # how it was before issue 6


def test_profile_use_refuses_a_profile_that_cannot_run_yet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "NOT_IMPLEMENTED", NOT_BUILT)
    params = tmp_path / "params.yaml"
    params.write_text("profile: digits\n")
    assert cli.main(["profile", "use", "sd15", "--params", str(params)]) == 2
    assert capsys.readouterr().err == (
        "spo profile: profile sd15 needs Pick-a-Pic preparation (prepare.dataset=pickapic_v1), which is not "
        "implemented yet; only the 'digits' profile runs today\n")
    assert params.read_text() == "profile: digits\n"


def test_profile_show_says_what_a_profile_that_cannot_run_needs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "NOT_IMPLEMENTED", NOT_BUILT)
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "profiles" / "sdxl.yaml").read_text())
    assert cli.main(["profile", "show", "--params", str(params)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"profile: sdxl ({params} == sdxl.yaml)",
        ("note: stages refuse this config: it needs Pick-a-Pic preparation (prepare.dataset=pickapic_v1) and the "
         "SDXL path (model.architecture=sdxl), not implemented yet")]


@pytest.mark.parametrize("kind", ["list", "latin1", "yaml", "missing"])
def test_profile_show_and_use_with_a_bad_params_file_are_one_line_exit_2(kind, tmp_path, capsys):
    params, message = bad_params(tmp_path, kind)
    assert cli.main(["profile", "show", "--params", params]) == 2
    assert capsys.readouterr().err == f"spo profile: {message}\n"


def test_profile_use_refuses_a_bad_profile_and_keeps_params(tmp_path, monkeypatch, capsys):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    broken = profiles / "broken.yaml"
    broken.write_text((REPO_ROOT / "profiles" / "digits.yaml").read_text()
                      .replace("profile: digits", "profile: broken").replace("beta: 10.0", "beta: ten"))
    monkeypatch.setattr("spo.config.PROFILES_DIR", profiles)
    params = tmp_path / "params.yaml"
    params.write_text("profile: digits\n")
    assert cli.main(["profile", "use", "broken", "--params", str(params)]) == 2
    assert capsys.readouterr().err == f"spo profile: {broken}: train_spo.beta: expected float, got str 'ten'\n"
    assert cli.main(["profile", "use", "missing", "--params", str(params)]) == 2
    assert capsys.readouterr().err == "spo profile: unknown profile 'missing'; known profiles: ['broken']\n"
    assert params.read_text() == "profile: digits\n"


def test_pipeline_dispatch_compiles(tmp_path):
    pytest.importorskip("kfp")
    out = tmp_path / "spo.yaml"
    assert cli.main(["pipeline", "compile", "--params", PARAMS, "--output", str(out),
                     "-S", "cluster.mlflow_tracking_uri=http://mlflow:5000"]) == 0
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"]["name"] == "spo-pipeline"


@pytest.mark.parametrize("kind", ["list", "latin1", "yaml", "missing", "override", "sd15"])
def test_pipeline_compile_with_bad_input_is_one_line_exit_2(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "NOT_IMPLEMENTED", NOT_BUILT)
    pytest.importorskip("kfp")
    out = tmp_path / "spo.yaml"
    if kind == "override":
        source, message = ["--params", PARAMS, "-S", BAD_OVERRIDE[0]], BAD_OVERRIDE[1]
    elif kind == "sd15":
        source, message = ["--profile", "sd15"], (
            "profile sd15 needs Pick-a-Pic preparation (prepare.dataset=pickapic_v1), which is not implemented "
            "yet; only the 'digits' profile runs today")
    else:
        params, message = bad_params(tmp_path, kind)
        source = ["--params", params]
    assert cli.main(["pipeline", "compile", *source, "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"spo pipeline compile: {message}\n"
    assert not out.exists()


def test_component_image_is_a_compile_option(tmp_path):
    pytest.importorskip("kfp")
    out = tmp_path / "spo.yaml"
    subprocess.run([sys.executable, "-m", "spo.cli", "pipeline", "compile", "--params", PARAMS, "--output", str(out),
                    "--image", "registry.example/spo:test", "-S", "cluster.mlflow_tracking_uri=http://mlflow:5000"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/spo:test"}


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert len(quickstart) == 2 and "dvc repro" in quickstart[0]
    assert ci[-1] == quickstart[1] == "python -m pytest -q"


def test_component_config_reads_the_stages_view_and_pins_threads(monkeypatch):
    """What every KFP stage component does first (spo.stages.stage_cli.component_config): its sections
    only (a section it was not given fails by name when read), torch's threads pinned."""
    import torch

    from spo.config import view_data
    from spo.stages import STAGE_SECTIONS
    from spo.stages.stage_cli import component_config

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    calls: list[int] = []
    params = yaml.safe_load((REPO_ROOT / "profiles" / "digits.yaml").read_text())
    cfg = component_config(yaml.safe_dump(view_data(params, STAGE_SECTIONS["train_spo"])), "train_spo")
    assert cfg.train_spo.beta == 10.0 and calls == [cfg.torch_threads] == [1]
    with pytest.raises(AttributeError, match="config section 'evaluate' was not passed to this stage"):
        cfg.evaluate.models
    with pytest.raises(config.ConfigError, match="train_spo config: config keys cluster, evaluate, prepare"):
        component_config(yaml.safe_dump(params), "train_spo")  # the whole config is not a view
