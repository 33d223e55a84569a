#!/usr/bin/env bash
# Install spo-pipeline non-editable with kfp, as the image does: the Dockerfile RUNs this script, and CI
# runs the very same steps in a venv (docker/check_install.sh).
#
#   docker/install.sh [SRC]        SRC: the project directory (default: this script's parent)
#
# Environment:
#   PYTHON          the interpreter to install into (default: python3)
#   TORCH_VERSION   default 2.13.0 (pyproject.toml pins torch>=2.13,<2.15)
#   TORCH_INDEX     a pip index to take torch from, e.g. https://download.pytorch.org/whl/cpu for the CPU
#                   build; empty (default): pip's own index, where an already installed torch of that
#                   version (the CUDA base image's) is kept and nothing is downloaded
#   SPO_ASSET_ROOT  when set, profiles/ and configs/ are copied there: an installed `spo` finds them
#                   through this variable (spo/asset_paths.py)
set -euo pipefail

src="$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")/..}" && pwd)"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
pip=("$python" -m pip install --no-cache-dir --disable-pip-version-check --no-input)

"$python" --version

# 1. torch first, pinned: resolved together with the package, an unpinned torch would be pip's default
#    build (CUDA, several GB) whatever the base image holds.
torch_source=()
if [[ -n "${TORCH_INDEX:-}" ]]; then
    torch_source=(--index-url "$TORCH_INDEX")
fi
"${pip[@]}" ${torch_source[@]+"${torch_source[@]}"} "torch==${torch_version}"

# 2. the package, non-editable, with the `pipeline` extra (kfp, kfp-kubernetes); the torch just installed
#    is a constraint, so no dependency can swap it for another build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$constraints"
"${pip[@]}" --constraint "$constraints" "${src}[pipeline]"

# 3. the assets the installed package reads (profiles, accelerate config), where SPO_ASSET_ROOT says
if [[ -n "${SPO_ASSET_ROOT:-}" ]]; then
    mkdir -p "$SPO_ASSET_ROOT"
    assets="$(cd "$SPO_ASSET_ROOT" && pwd)"
    if [[ "$assets" != "$src" ]]; then
        rm -rf "$assets/profiles" "$assets/configs"
        cp -R "$src/profiles" "$src/configs" "$assets/"
    fi
    echo "assets: $assets"
fi

"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
