#!/usr/bin/env bash
# The image's install, checked without Docker (CI: .ci/run; tests/test_image.py, slow):
#   1. copies the build context (the `!` paths of .dockerignore) to a temp dir,
#   2. runs docker/install.sh from that copy into a fresh venv, with SPO_ASSET_ROOT set as in the image,
#   3. from a directory outside the repository: imports spo, components.stages and pipelines.spo_pipeline
#      and checks that they are the venv's installed copy (not the source tree), loads the digits and
#      sd15 profiles, finds the accelerate config, runs `spo --help` and compiles the pipeline twice
#      (`python -m pipelines.cli compile --profile digits`, `spo pipeline compile --params <repo>/params.yaml`).
# The venv is made with --system-site-packages so that the dependencies this machine already has (torch,
# diffusers, mlflow, kfp, ...) are reused and nothing big is downloaded again: only spo-pipeline itself
# is built and installed into the venv (pip fetches setuptools for the isolated build), ahead of any
# editable install of the system's site-packages on sys.path. Other missing dependencies are installed
# as in the image; a missing torch only with TORCH_INDEX set (passed on to install.sh).
#   PYTHON: the interpreter for the venv (default python3; CI: python, the one it installed into).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/spo-install-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# 1. what `docker build` sends: .dockerignore is an allowlist, one `!` path a line
mapfile -t context < <(sed -n 's/^!//p' "$repo/.dockerignore")
mkdir "$work/src" "$work/outside"
tar -C "$repo" -cf - --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' --exclude='.*.lock' \
    --exclude='.*.tmp-*' --exclude='.*.old-*' "${context[@]}" | tar -C "$work/src" -xf -

# 2. the install, as the Dockerfile runs it. Without TORCH_INDEX, install.sh would take torch from PyPI: a
#    CUDA build of several GB. Refuse that here; CI installs torch (CPU) first.
torch_version="${TORCH_VERSION:-2.13.0}"
if [[ -z "${TORCH_INDEX:-}" ]] && ! "$python" -c "import importlib.metadata as m, sys; from packaging.version import Version
sys.exit(Version(m.version('torch')).base_version != '$torch_version')" 2>/dev/null; then
    echo "check_install: $python has no torch $torch_version to reuse: install it first, or set TORCH_INDEX" >&2
    exit 2
fi

"$python" -m venv --system-site-packages "$work/venv"
venv_python="$work/venv/bin/python"
# PIP_QUIET: only pip's warnings and errors (the image build shows its full output)
PIP_QUIET=1 SPO_ASSET_ROOT="$work/assets" PYTHON="$venv_python" bash "$work/src/docker/install.sh" "$work/src"

# 3. the installed copy, used from outside the repository
cd "$work/outside"
run() { env -u PYTHONPATH -u SPO_ACCELERATE_CONFIG SPO_ASSET_ROOT="$work/assets" SPO_CHECK_REPO="$repo" "$@"; }
run "$venv_python" - <<'PY'
import os
import sys
import sysconfig
from pathlib import Path

repo = Path(os.environ["SPO_CHECK_REPO"]).resolve()
assets = Path(os.environ["SPO_ASSET_ROOT"]).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(sys.prefix).resolve() != Path(sys.base_prefix).resolve(), "not running in the venv"
assert all(Path(p or ".").resolve() != repo for p in sys.path), f"the repository is on sys.path: {sys.path}"

import components.stages
import pipelines.spo_pipeline
import spo
from spo.asset_paths import asset_root
from spo.config import PROFILES_DIR, load_profile
from spo.stages.stage_cli import DEFAULT_ACCELERATE_CONFIG, accelerate_command

for module in (spo, components.stages, pipelines.spo_pipeline):
    path = Path(module.__file__).resolve()
    assert path.is_relative_to(site), f"{module.__name__} imported from {path}, not from the venv's {site}"
    assert not path.is_relative_to(repo), f"{module.__name__} imported from the source tree: {path}"
assert asset_root().resolve() == assets, f"asset root {asset_root()}, expected {assets}"
assert PROFILES_DIR.resolve() == assets / "profiles", PROFILES_DIR
for name in ("digits", "sd15"):
    assert load_profile(name).profile == name
assert DEFAULT_ACCELERATE_CONFIG.is_file() and DEFAULT_ACCELERATE_CONFIG.resolve().is_relative_to(assets), \
    DEFAULT_ACCELERATE_CONFIG
assert str(DEFAULT_ACCELERATE_CONFIG) in accelerate_command("train_spo", [], 2)
print(f"installed spo: {Path(spo.__file__).parent}; profiles: {PROFILES_DIR}; accelerate: {DEFAULT_ACCELERATE_CONFIG}")
PY

spo_script="$work/venv/bin/spo"
[[ "$(head -n 1 "$spo_script")" == "#!$work/venv/bin/python"* ]] || { echo "spo script not the venv's" >&2; exit 1; }
run "$spo_script" --help >/dev/null
mlflow=(-S cluster.mlflow_tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000)
run "$venv_python" -m pipelines.cli compile --profile digits "${mlflow[@]}" --output "$work/digits.yaml"
run "$spo_script" pipeline compile --params "$repo/params.yaml" "${mlflow[@]}" --output "$work/params.yaml"
grep -q "ghcr.io/spo-pipeline/spo:" "$work/digits.yaml" "$work/params.yaml"
echo "check_install: OK in $((SECONDS - start)) s"
